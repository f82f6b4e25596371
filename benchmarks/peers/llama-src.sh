#!/usr/bin/env bash
# Make a trimmed llama.cpp source tarball (about 4 MB) that fits the device's carry limit, from the
# llama-cpp-python source distribution on the package index (it vendors llama.cpp).
#   usage: benchmarks/peers/llama-src.sh [OUT_DIR]   -> OUT_DIR/llama-src.tgz (default: this folder)
# It keeps what benchmarks/peers.py needs: llama-bench, llama-quantize (Q4_0: convert_hf_to_gguf.py's --outtype
# stops at q8_0), llama-greedy-ids (greedy-ids.cpp beside this script: greedy token ids for a prompt of ids),
# convert_hf_to_gguf.py with conversion/ and gguf-py/ (run with PYTHONPATH=llama.cpp/gguf-py).
# Build (peers.py does this itself; README.md has the measured times):
#   tar xzf llama-src.tgz && cd llama.cpp && cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
#     -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
#     -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
#     && cmake --build build -j16 --target llama-bench llama-quantize llama-greedy-ids
# llama-bench there has -ngl, -ncmoe/--n-cpu-moe, -ot/--override-tensor, -lm/--load-mode (mmap|dio|...), -t.
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
out=$(readlink -f "${1:-$here}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
python3 -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d .
tar xzf llama_cpp_python-0.3.36.tar.gz
cd llama_cpp_python-0.3.36/vendor/llama.cpp
rm -rf models docs tests benches .github media
find examples -mindepth 1 -maxdepth 1 ! -name CMakeLists.txt -exec rm -rf {} +
(cd ggml/src && rm -rf ggml-vulkan ggml-sycl ggml-metal ggml-opencl ggml-cann ggml-musa ggml-hip ggml-kompute \
  ggml-webgpu ggml-zdnn ggml-rpc ggml-blas ggml-hexagon ggml-zendnn ggml-openvino)
# tools: llama-bench, quantize, and our greedy-ids (next to the others, so LLAMA_BUILD_EXAMPLES can stay OFF)
find tools -mindepth 1 -maxdepth 1 ! -name CMakeLists.txt ! -name llama-bench ! -name quantize -exec rm -rf {} +
mkdir tools/greedy-ids
cp "$here/greedy-ids.cpp" tools/greedy-ids/
cat > tools/greedy-ids/CMakeLists.txt <<'EOF'
add_executable(llama-greedy-ids greedy-ids.cpp)
target_link_libraries(llama-greedy-ids PRIVATE llama ${CMAKE_THREAD_LIBS_INIT})
target_compile_features(llama-greedy-ids PRIVATE cxx_std_17)
EOF
printf 'add_subdirectory(llama-bench)\nadd_subdirectory(quantize)\nadd_subdirectory(greedy-ids)\n' > tools/CMakeLists.txt
cd ..
mkdir -p "$out"
tar czf "$out/llama-src.tgz" llama.cpp
ls -la "$out/llama-src.tgz"
