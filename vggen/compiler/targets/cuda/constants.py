"""The GPU the CUDA kernels are shaped for: an H100/H200.

Edit here for another device; `vggen build`.
"""

# Threads per block; block reductions assume a power of two.
THREADS = 256
# Blocks resident at once (132 SMs × 2 blocks of 256 threads, ≤ 128 registers
# each): the fixed grid of the kernels that share their work out themselves
# (tiled contractions, split reductions).  Any other grid is correct too.
RESIDENT_BLOCKS = 264
