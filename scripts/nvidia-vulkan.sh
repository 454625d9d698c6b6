# shellcheck shell=bash
# Sourced by the scripts that run on a GPU machine (gpu-matrix.sh, gpu-bench.sh): unpacks the
# Vulkan loader from .gl/ where the machine has none, points it at NVIDIA's driver where that is
# installed, and has wgpu take Vulkan unless WGPU_BACKEND says otherwise.
if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan.so.1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -e "$nvidia_icd" ]; then export VK_DRIVER_FILES=$nvidia_icd; fi
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}
