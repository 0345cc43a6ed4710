// PyTorch binding of the block gather (the kernel is in block_gather_kernel.cu). It takes the
// CUDA stream as an integer so that this file needs no CUDA headers.
#include <torch/extension.h>

int hip_attn_gather_blocks(const int64_t* chunks, const int64_t* rows, const int64_t* blocks,
                           const int64_t* k_slots_of, const int64_t* v_slots_of, void* k_slots,
                           void* v_slots, int64_t n,
                           int64_t chunk_blocks, int64_t token_bytes, int64_t row_bytes,
                           int64_t block_bytes, int64_t slots_per_row, void* stream);

void gather_blocks(const torch::Tensor& chunks, const torch::Tensor& rows,
                   const torch::Tensor& blocks, const torch::Tensor& k_slots_of,
                   const torch::Tensor& v_slots_of, torch::Tensor& k_slots,
                   torch::Tensor& v_slots, int64_t chunk_blocks, int64_t token_bytes,
                   int64_t row_bytes, int64_t stream) {
  for (const auto* t : {&chunks, &rows, &blocks, &k_slots_of, &v_slots_of}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "gather_blocks: index tensors must be contiguous int64 CUDA tensors");
  }
  TORCH_CHECK(k_slots.is_cuda() && v_slots.is_cuda() && k_slots.is_contiguous() &&
                  v_slots.is_contiguous() && k_slots.dim() == 4,
              "gather_blocks: the slots must be contiguous [rows, slots, bk, D] CUDA tensors");
  TORCH_CHECK(row_bytes % 16 == 0, "gather_blocks: a row's D values must be a multiple of 16 bytes");
  const int64_t block_bytes = k_slots.size(2) * k_slots.size(3) * k_slots.element_size();
  TORCH_CHECK(block_bytes % row_bytes == 0, "gather_blocks: block and row sizes disagree");
  const int err = hip_attn_gather_blocks(
      chunks.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(),
      k_slots_of.data_ptr<int64_t>(), v_slots_of.data_ptr<int64_t>(), k_slots.data_ptr(),
      v_slots.data_ptr(), rows.numel(),
      chunk_blocks, token_bytes, row_bytes, block_bytes, k_slots.size(1),
      reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "gather_blocks: kernel launch failed with CUDA error ", err);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_blocks", &gather_blocks, "Copy KV blocks from pinned host memory into slots");
}
