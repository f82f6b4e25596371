// llama-greedy-ids: greedy tokens of a llama.cpp model for a prompt given as token ids, printed as ids.
//   llama-greedy-ids -m model.gguf [-ngl 99] [-n 8] ID ID ID ...   -> stdout: one line of generated ids
// The peers benchmark (benchmarks/peers.py) feeds the same ids to flashmoe and compares the two lines.
// Built from examples/simple (same calls); unlike it, ids in and out (no tokenizer round trip) and no stop
// on end-of-generation tokens (a random-weight model emits them as often as any other).
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

int main(int argc, char ** argv) {
    const char * model_path = nullptr;
    int ngl = 99, n_predict = 8, i = 1;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc)        { model_path = argv[++i]; }
        else if (!strcmp(argv[i], "-ngl") && i + 1 < argc) { ngl = atoi(argv[++i]); }
        else if (!strcmp(argv[i], "-n") && i + 1 < argc)   { n_predict = atoi(argv[++i]); }
        else break;
    }
    std::vector<llama_token> prompt;
    for (; i < argc; i++) prompt.push_back(atoi(argv[i]));
    if (!model_path || prompt.empty() || n_predict < 1) {
        fprintf(stderr, "usage: %s -m model.gguf [-ngl N] [-n N] ID [ID ...]\n", argv[0]);
        return 1;
    }
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);  // stdout/stderr: only the ids or an error
    llama_backend_init();
    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = ngl;
    llama_model * model = llama_model_load_from_file(model_path, mparams);
    if (!model) { fprintf(stderr, "error: unable to load %s\n", model_path); return 1; }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = prompt.size() + n_predict;
    cparams.n_batch = prompt.size();
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) { fprintf(stderr, "error: failed to create the context\n"); return 1; }
    llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    std::vector<llama_token> step = prompt;
    llama_pos pos = 0;
    for (int n = 0; n < n_predict; n++) {
        llama_batch_ext_clear(batch);
        for (size_t t = 0; t < step.size(); t++) {
            const int32_t idx = llama_batch_ext_add_token(batch, 0, step[t]);
            const llama_pos p = pos + (llama_pos) t;
            llama_batch_ext_set_pos(batch, idx, &p);
        }
        llama_batch_ext_set_output_logits(batch, step.size() - 1, true);
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) { fprintf(stderr, "error: decode failed\n"); return 1; }
        pos += step.size();
        const llama_token next = llama_sampler_sample(smpl, ctx, -1);
        printf("%s%d", n ? " " : "", next);
        step.assign(1, next);
    }
    printf("\n");
    llama_batch_ext_free(batch);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
