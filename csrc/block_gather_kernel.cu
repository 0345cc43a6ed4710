// Copy key/value blocks from pinned host memory straight into GPU block-cache slots.
//
// Pinned host memory is mapped into the device address space (unified virtual addressing), so
// the kernel reads it over PCIe with plain loads: one CUDA block per (row, block) pair, 16-byte
// loads, no staging buffer and no extra copy on the GPU. A host chunk holds
// [tokens, K or V, rows, D] (hip_attn.offload.host.HostKV), so a block is `bk` runs of D values
// a token apart. The list has a fixed length (the block cache's request); each entry names the
// slot its keys go to and the slot its values go to, -1 for none (a search's candidates come
// without their values; a resident block may need only its values), so the host never reads
// how many blocks missed.
#include <cstdint>
#include <cuda_runtime.h>

namespace {

struct GatherArgs {
  const int64_t* chunks;  // host addresses of the chunks
  const int64_t* rows;    // (batch, kv head) row of each block to copy
  const int64_t* blocks;  // its block index
  const int64_t* k_slots_of;  // the slot its keys go to; -1: not copied
  const int64_t* v_slots_of;  // the slot its values go to; -1: not copied
  char* k_slots;          // [rows, slots, block_bytes]
  char* v_slots;
  int64_t chunk_blocks;   // blocks per chunk
  int64_t token_bytes;    // bytes of one token of a chunk: K then V of every row
  int64_t row_bytes;      // bytes of one row's D values (a multiple of 16)
  int64_t block_bytes;    // bytes of one block in a slot
  int64_t slots_per_row;
};

// Entry i's block, K and/or V, 16 bytes at a time from byte `first` on, every `step` bytes: all
// a thread of the kernel does, in a function of its own so that a test runs it on the host
// (tests/csrc/gather_on_host.cu).
__host__ __device__ inline void gather_entry(const GatherArgs& a, int64_t i, int64_t first,
                                             int64_t step) {
  const int64_t row = a.rows[i], block = a.blocks[i];
  const int64_t k_slot = a.k_slots_of[i], v_slot = a.v_slots_of[i];
  if (k_slot < 0 && v_slot < 0) return;
  const int64_t block_tokens = a.block_bytes / a.row_bytes;
  const char* k_block = reinterpret_cast<const char*>(a.chunks[block / a.chunk_blocks]) +
                        (block % a.chunk_blocks) * block_tokens * a.token_bytes + row * a.row_bytes;
  // the same branches for every thread of a CUDA block (one entry): no divergence
  char* k_dst = k_slot < 0 ? nullptr : a.k_slots + (row * a.slots_per_row + k_slot) * a.block_bytes;
  char* v_dst = v_slot < 0 ? nullptr : a.v_slots + (row * a.slots_per_row + v_slot) * a.block_bytes;
  for (int64_t off = first; off < a.block_bytes; off += step) {
    const int64_t token = off / a.row_bytes;
    const char* k_src = k_block + token * a.token_bytes + (off - token * a.row_bytes);
    if (k_dst) *reinterpret_cast<uint4*>(k_dst + off) = *reinterpret_cast<const uint4*>(k_src);
    if (v_dst)  // a token's values follow the keys of every row
      *reinterpret_cast<uint4*>(v_dst + off) =
          *reinterpret_cast<const uint4*>(k_src + a.token_bytes / 2);
  }
}

__global__ void gather_blocks_kernel(GatherArgs a) {
  gather_entry(a, blockIdx.x, 16 * threadIdx.x, 16 * blockDim.x);
}

}  // namespace

// Launches on `stream`; returns the launch's cudaError_t as an int.
int hip_attn_gather_blocks(const int64_t* chunks, const int64_t* rows, const int64_t* blocks,
                           const int64_t* k_slots_of, const int64_t* v_slots_of, void* k_slots,
                           void* v_slots, int64_t n,
                           int64_t chunk_blocks, int64_t token_bytes, int64_t row_bytes,
                           int64_t block_bytes, int64_t slots_per_row, void* stream) {
  if (n == 0) return 0;
  const GatherArgs args{chunks,
                        rows,
                        blocks,
                        k_slots_of,
                        v_slots_of,
                        static_cast<char*>(k_slots),
                        static_cast<char*>(v_slots),
                        chunk_blocks,
                        token_bytes,
                        row_bytes,
                        block_bytes,
                        slots_per_row};
  gather_blocks_kernel<<<static_cast<unsigned int>(n), 128, 0,
                         static_cast<cudaStream_t>(stream)>>>(args);
  return static_cast<int>(cudaGetLastError());
}
