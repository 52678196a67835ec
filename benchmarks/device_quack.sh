#!/usr/bin/env bash
# Install QuACK (switchyard's [quack] extra) on a lent device machine, whose image lacks it and cannot download.
#
# Its wheels are ~100 MB (nvidia-cutlass-dsl-libs-cu13 alone 92 MB), over one device call's 64 MiB carry, so
# they travel in two calls on the same warm machine (it stays warm ~30 s after a call: issue the second at once):
#
#   here, once:   pip download --no-deps (see the device README) quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 \
#                   nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
#                   nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi torch-c-dlpack-ext
#                 split -b 58000000 -d nvidia_cutlass_dsl_libs_cu13-*.whl part   ->  .qk1/part00, .qk2/part01
#                 and the other wheels into .qk2/ (both folders git-ignored)
#   call A:       bash benchmarks/device_quack.sh stage          (carry [".qk1"]: keeps part00 in /tmp/qk)
#   call B:       bash benchmarks/device_quack.sh install && bash benchmarks/device_run.sh layer
#                                                              (carry [".qk2", ".whl"])
set -euo pipefail
case ${1:?"usage: bash benchmarks/device_quack.sh stage|install"} in
stage)
    mkdir -p /tmp/qk && cp .qk1/part00 /tmp/qk/ ;;
install)
    [ -f /tmp/qk/part00 ] || { echo "/tmp/qk/part00 is missing: the machine went cold after call A; run it again"; exit 3; }
    cat /tmp/qk/part00 .qk2/part01 > /tmp/qk/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
    # one pip call: the cutlass-dsl wheels share a top-level folder, which a second --target call would not merge
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/qk/*.whl .qk2/*.whl
    # pip --target skips .pth files: device_run.sh puts the CuTe DSL packages on PYTHONPATH itself
    PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python3 -c "import quack; print('quack', quack.__version__)" ;;
*)
    echo "usage: bash benchmarks/device_quack.sh stage|install"; exit 2 ;;
esac
