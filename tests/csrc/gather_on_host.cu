// Runs the block gather kernel's work (gather_entry) on the host, so that its address
// arithmetic is checked where no GPU is (tests/test_offload.py builds and runs this with nvcc).
// Usage: gather_on_host DIR, with DIR holding the raw inputs the test wrote (see the test);
// writes DIR/k_out and DIR/v_out.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../../csrc/block_gather_kernel.cu"

static std::vector<char> slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  int64_t n_chunks, n, chunk_blocks, token_bytes, row_bytes, block_bytes, slots_per_row;
  std::ifstream p(dir + "/params");
  p >> n_chunks >> n >> chunk_blocks >> token_bytes >> row_bytes >> block_bytes >> slots_per_row;
  std::vector<std::vector<char>> chunks;
  std::vector<int64_t> addresses;
  for (int64_t c = 0; c < n_chunks; ++c) chunks.push_back(slurp(dir + "/chunk" + std::to_string(c)));
  for (auto& c : chunks) addresses.push_back(reinterpret_cast<int64_t>(c.data()));
  std::vector<char> rows = slurp(dir + "/rows"), blocks = slurp(dir + "/blocks"),
                    k_slots = slurp(dir + "/k_slots"), v_slots = slurp(dir + "/v_slots"),
                    k = slurp(dir + "/k"), v = slurp(dir + "/v");
  const GatherArgs a{addresses.data(), reinterpret_cast<const int64_t*>(rows.data()),
                     reinterpret_cast<const int64_t*>(blocks.data()),
                     reinterpret_cast<const int64_t*>(k_slots.data()),
                     reinterpret_cast<const int64_t*>(v_slots.data()), k.data(), v.data(),
                     chunk_blocks, token_bytes, row_bytes, block_bytes, slots_per_row};
  for (int64_t i = 0; i < n; ++i) gather_entry(a, i, 0, 16);  // the kernel's blocks, one thread
  std::ofstream(dir + "/k_out", std::ios::binary).write(k.data(), k.size());
  std::ofstream(dir + "/v_out", std::ios::binary).write(v.data(), v.size());
  return 0;
}
