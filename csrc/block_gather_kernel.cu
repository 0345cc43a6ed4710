// Copy key/value blocks from pinned host memory straight into GPU block-cache slots.
//
// Pinned host memory is mapped into the device address space (unified virtual addressing), so
// the kernel reads it over PCIe with plain loads: one CUDA block per (row, block) pair, 16-byte
// loads, no staging buffer and no extra copy on the GPU. A host chunk holds
// [tokens, K or V, rows, D] (hip_attn.offload.host.HostKV), so a block is `bk` runs of D values
// a token apart. The list has a fixed length (the block cache's request); entries with slot -1
// are not to be copied and return at once, so the host never reads how many blocks missed.
#include <cstdint>
#include <cuda_runtime.h>

namespace {

__global__ void gather_blocks_kernel(
    const int64_t* __restrict__ chunks,  // host addresses of the chunks
    const int64_t* __restrict__ rows,    // (batch, kv head) row of each block to copy
    const int64_t* __restrict__ blocks,  // its block index
    const int64_t* __restrict__ slots,   // the slot it goes to; -1: nothing to copy
    char* __restrict__ k_slots,          // [rows, slots, block_bytes]
    char* __restrict__ v_slots,
    int64_t chunk_blocks,   // blocks per chunk
    int64_t token_bytes,    // bytes of one token of a chunk: K then V of every row
    int64_t row_bytes,      // bytes of one row's D values (a multiple of 16)
    int64_t block_bytes,    // bytes of one block in a slot
    int64_t slots_per_row) {
  const int64_t i = blockIdx.x;
  const int64_t row = rows[i], block = blocks[i], slot = slots[i];
  if (slot < 0) return;
  const int64_t block_tokens = block_bytes / row_bytes;
  const char* k_src = reinterpret_cast<const char*>(chunks[block / chunk_blocks]) +
                      (block % chunk_blocks) * block_tokens * token_bytes + row * row_bytes;
  const char* v_src = k_src + token_bytes / 2;
  const int64_t dst = (row * slots_per_row + slot) * block_bytes;
  for (int64_t off = 16 * threadIdx.x; off < block_bytes; off += 16 * blockDim.x) {
    const int64_t token = off / row_bytes;
    const int64_t src = token * token_bytes + (off - token * row_bytes);
    *reinterpret_cast<uint4*>(k_slots + dst + off) = *reinterpret_cast<const uint4*>(k_src + src);
    *reinterpret_cast<uint4*>(v_slots + dst + off) = *reinterpret_cast<const uint4*>(v_src + src);
  }
}

}  // namespace

// Launches on `stream`; returns the launch's cudaError_t as an int.
int hip_attn_gather_blocks(const int64_t* chunks, const int64_t* rows, const int64_t* blocks,
                           const int64_t* slots, void* k_slots, void* v_slots, int64_t n,
                           int64_t chunk_blocks, int64_t token_bytes, int64_t row_bytes,
                           int64_t block_bytes, int64_t slots_per_row, void* stream) {
  if (n == 0) return 0;
  const int threads = 128;
  gather_blocks_kernel<<<static_cast<unsigned int>(n), threads, 0,
                         static_cast<cudaStream_t>(stream)>>>(
      chunks, rows, blocks, slots, static_cast<char*>(k_slots), static_cast<char*>(v_slots),
      chunk_blocks, token_bytes, row_bytes, block_bytes, slots_per_row);
  return static_cast<int>(cudaGetLastError());
}
