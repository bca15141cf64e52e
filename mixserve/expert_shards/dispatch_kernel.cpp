// The CPU side of one MoE layer's dispatch in single calls: pack every shard's request, and add
// an answer's rows back to their tokens. Built at run time by dispatch_kernel.py (why it is
// hand-written, and what it saves, is written there).
//
// Shape legend: T = tokens, K = slots (experts) per token, D = model dim, E = experts,
// S = shards, T_s = tokens with at least one slot on shard s, N = sum over s of T_s.

#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <vector>

namespace {

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// True if slot k of a token is the first of its slots that goes to its shard: a token is sent
// to a shard once, however many of its slots the shard computes.
inline bool first_slot_on_its_shard(const int64_t* token_shards, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    if (token_shards[j] == token_shards[k]) return false;
  }
  return true;
}

// Where a shard's request lies in its block, in bytes from the block's start (x at 0).
struct BlockLayout {
  int64_t block_at = 0, ids_at = 0, weights_at = 0, end = 0;
};

inline int64_t round_up_8(int64_t n) { return (n + 7) / 8 * 8; }

}  // namespace

// x [T, D], expert_ids [T, K] int64, weights [T, K] in x's dtype, first_holder [E] int64 (the
// shard of each expert's first holder), shard_of [T, K] int64 or None (the shard of every slot,
// when some expert has copies; else every slot goes to its expert's first holder).
// Returns (shard_of [T, K], result [T, D] uninitialised (add_rows_at's first add sets it),
// blocks (uint8), replies [N, D] uninitialised, token [N], parts). Each shard with rows has one
// block of `blocks`: x [T_s, D], then expert_ids [T_s, K] (-1 where another shard computes the
// slot), then weights [T_s, K] (0 there); its tokens, in order, and the rows where its answer
// lands are token[r, r + T_s) and replies[r, r + T_s). parts holds, for each such shard in shard
// order, (shard, T_s, r, block_at, ids_at, weights_at, frames, reply_frame): the byte offsets of
// its block and of the ids and weights within it, `frames` the memoryviews of its request's bytes
// as the channel sends them (the whole block, or x, ids and weights where D's bytes leave the
// ids off an 8-byte boundary), `reply_frame` a writable memoryview of its replies' rows.
// No tensor views here: made for every shard of every layer they cost ~50 us with the caches
// cold, and the channel needs none of them. The memoryviews do not keep the buffers alive:
// whoever holds one must hold `blocks` and `replies` too.
py::tuple pack(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& weights_in,
               const at::Tensor& first_holder, const std::optional<at::Tensor>& shard_of_in, int64_t n_shards) {
  TORCH_CHECK(x_in.device().is_cpu() && ids_in.device().is_cpu() && weights_in.device().is_cpu(), "pack takes CPU tensors");
  // (.contiguous() returns the tensor itself when it already is; a copy lives as long as these names)
  const at::Tensor x = x_in.contiguous(), expert_ids = ids_in.contiguous(), weights = weights_in.contiguous();
  check_cpu_contiguous(first_holder, "first_holder");
  TORCH_CHECK(x.dim() == 2 && expert_ids.dim() == 2 && expert_ids.size(0) == x.size(0), "x [T, D] and expert_ids [T, K] must agree");
  TORCH_CHECK(weights.sizes() == expert_ids.sizes() && weights.scalar_type() == x.scalar_type(),
              "weights must be [T, K] in x's dtype");
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong && first_holder.scalar_type() == at::kLong && first_holder.dim() == 1,
              "expert_ids and first_holder must be int64");
  TORCH_CHECK(n_shards > 0, "n_shards must be positive");
  at::Tensor given;
  if (shard_of_in.has_value()) {
    given = shard_of_in->contiguous();
    TORCH_CHECK(given.device().is_cpu() && given.sizes() == expert_ids.sizes() && given.scalar_type() == at::kLong,
                "shard_of must be [T, K] int64 on the CPU");
  }
  const int64_t T = x.size(0), D = x.size(1), K = expert_ids.size(1), E = first_holder.size(0);

  at::Tensor shard_of, blocks, token, replies, result;
  std::vector<int64_t> start(n_shards + 1, 0);
  std::vector<BlockLayout> layouts(n_shards);
  const int64_t row_bytes = D * x.element_size(), weight_bytes = weights.element_size();
  {
    // A prefill's pack copies megabytes: the replica's other threads (its event loop) run meanwhile.
    py::gil_scoped_release no_gil;
    const int64_t* ids = expert_ids.data_ptr<int64_t>();
    // Every slot's shard, read once: the passes below trust these values, never the caller's memory.
    std::vector<int64_t> slot_shard(T * K);
    if (given.defined()) {
      if (!slot_shard.empty()) std::memcpy(slot_shard.data(), given.data_ptr<int64_t>(), slot_shard.size() * sizeof(int64_t));
      shard_of = given;
    } else {
      const int64_t* holder = first_holder.data_ptr<int64_t>();
      for (int64_t i = 0; i < T * K; ++i) {
        TORCH_CHECK(ids[i] >= 0 && ids[i] < E, "expert id ", ids[i], " is not in [0, ", E, ")");
        slot_shard[i] = holder[ids[i]];
      }
      shard_of = at::empty({T, K}, expert_ids.options());
      if (!slot_shard.empty()) std::memcpy(shard_of.data_ptr<int64_t>(), slot_shard.data(), slot_shard.size() * sizeof(int64_t));
    }
    const int64_t* shard = slot_shard.data();

    // Rows per shard, then where each shard's rows start.
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = shard[t * K + k];
        TORCH_CHECK(s >= 0 && s < n_shards, "shard ", s, " is not in [0, ", n_shards, ")");
        if (first_slot_on_its_shard(shard + t * K, k)) ++start[s + 1];
      }
    }
    for (int64_t s = 0; s < n_shards; ++s) start[s + 1] += start[s];
    const int64_t N = start[n_shards];

    // Each shard's request in one block of its own, laid out as the channel sends it: x [T_s, D],
    // then ids [T_s, K] (at an 8-byte boundary), then weights [T_s, K]; blocks start at 8-byte
    // boundaries of one buffer.
    for (int64_t s = 0; s < n_shards; ++s) {
      const int64_t rows = start[s + 1] - start[s];
      layouts[s].ids_at = round_up_8(rows * row_bytes);
      layouts[s].weights_at = layouts[s].ids_at + rows * K * 8;
      layouts[s].end = layouts[s].weights_at + rows * K * weight_bytes;
      layouts[s].block_at = s == 0 ? 0 : round_up_8(layouts[s - 1].block_at + layouts[s - 1].end);
    }
    blocks = at::empty({round_up_8(layouts[n_shards - 1].block_at + layouts[n_shards - 1].end)}, x.options().dtype(at::kByte));
    token = at::empty({N}, expert_ids.options());
    replies = at::empty({N, D}, x.options());
    result = at::empty({T, D}, x.options());

    // The rows: each token, in order, goes to each of its shards' next row (weights are copied as
    // bytes, so one loop serves every dtype; all-zero bytes are +0.0).
    const char* x_from = static_cast<const char*>(x.data_ptr());
    const char* w_from = static_cast<const char*>(weights.data_ptr());
    char* base = static_cast<char*>(blocks.data_ptr());
    int64_t* token_out = token.data_ptr<int64_t>();
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t* token_shards = shard + t * K;
      for (int64_t k = 0; k < K; ++k) {
        if (!first_slot_on_its_shard(token_shards, k)) continue;
        const int64_t s = token_shards[k];
        const int64_t n = next[s]++;
        const int64_t row = n - start[s];  // within the shard's block
        char* block = base + layouts[s].block_at;
        if (row_bytes) std::memcpy(block + row * row_bytes, x_from + t * row_bytes, row_bytes);
        int64_t* ids_out = reinterpret_cast<int64_t*>(block + layouts[s].ids_at) + row * K;
        char* w_out = block + layouts[s].weights_at + row * K * weight_bytes;
        for (int64_t j = 0; j < K; ++j) {
          const bool here = token_shards[j] == s;
          ids_out[j] = here ? ids[t * K + j] : -1;
          if (here) {
            std::memcpy(w_out + j * weight_bytes, w_from + (t * K + j) * weight_bytes, weight_bytes);
          } else {
            std::memset(w_out + j * weight_bytes, 0, weight_bytes);
          }
        }
        token_out[n] = t;
      }
    }
  }

  py::list parts;
  char* base = static_cast<char*>(blocks.data_ptr());
  char* reply_base = static_cast<char*>(replies.data_ptr());
  for (int64_t s = 0; s < n_shards; ++s) {
    const int64_t rows = start[s + 1] - start[s];
    if (rows == 0) continue;
    const BlockLayout& layout = layouts[s];
    char* block = base + layout.block_at;
    py::list frames;
    if (layout.ids_at == rows * row_bytes) {  // nothing pads the ids' start: the block as it lies
      frames.append(py::memoryview::from_memory(block, layout.end, true));
    } else {
      frames.append(py::memoryview::from_memory(block, rows * row_bytes, true));
      frames.append(py::memoryview::from_memory(block + layout.ids_at, layout.weights_at - layout.ids_at, true));
      frames.append(py::memoryview::from_memory(block + layout.weights_at, layout.end - layout.weights_at, true));
    }
    parts.append(py::make_tuple(s, rows, start[s], layout.block_at, layout.ids_at, layout.weights_at, frames,
                                py::memoryview::from_memory(reply_base + start[s] * row_bytes, rows * row_bytes, false)));
  }
  return py::make_tuple(shard_of, result, blocks, replies, token, parts);
}

// One shard's answer added to its tokens: result[token[start + i]] += rows[start + i] for i in
// [0, count), in order of i (so a token's rows add up in a fixed order); each add rounds to
// result's dtype, as index_add_ does. result [T, D], token [N] int64, rows [N, D]. With `first`
// (the call's first answer) result may be uninitialised: these tokens' rows become 0 + the
// answer's (as added to zeros) and every other token's row 0, in one pass instead of zeroing
// result before the request goes out; its tokens must then be in increasing order, as pack
// gives them.
void add_rows_at(at::Tensor& result, const at::Tensor& token, const at::Tensor& rows, int64_t start, int64_t count,
                 bool first) {
  check_cpu_contiguous(result, "result");
  check_cpu_contiguous(token, "token");
  check_cpu_contiguous(rows, "rows");
  TORCH_CHECK(result.dim() == 2 && rows.dim() == 2 && rows.size(1) == result.size(1) && rows.scalar_type() == result.scalar_type(),
              "rows must be [N, D] in result's dtype");
  TORCH_CHECK(token.scalar_type() == at::kLong && token.dim() == 1 && token.size(0) == rows.size(0), "token must be [N] int64");
  TORCH_CHECK(start >= 0 && count >= 0 && start + count <= rows.size(0), "rows [", start, ", ", start + count,
              ") are not in [0, ", rows.size(0), ")");
  TORCH_CHECK(!result.requires_grad(), "add_rows_at writes in place: result must not require grad");
  at::assert_no_overlap(result, rows);  // rows read after some of result was written would be wrong
  const int64_t D = rows.size(1), T = result.size(0);
  const int64_t* at_token = token.data_ptr<int64_t>() + start;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(at_token[i] >= 0 && at_token[i] < T, "token ", at_token[i], " is not in [0, ", T, ")");
    TORCH_CHECK(!first || i == 0 || at_token[i] > at_token[i - 1], "a first add takes its tokens in increasing order");
  }
  py::gil_scoped_release no_gil;  // (a prefill's answers are megabytes)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "add_rows_at", [&] {
    scalar_t* out = result.data_ptr<scalar_t>();
    const scalar_t* in = rows.data_ptr<scalar_t>() + start * D;
    const scalar_t zero(0);
    if (first) {
      int64_t next = 0;  // the next of these tokens
      for (int64_t t = 0; t < T; ++t) {
        scalar_t* to = out + t * D;
        if (next < count && at_token[next] == t) {
          const scalar_t* from = in + next * D;
          for (int64_t d = 0; d < D; ++d) to[d] = zero + from[d];
          ++next;
        } else {
          for (int64_t d = 0; d < D; ++d) to[d] = zero;
        }
      }
      return;
    }
    for (int64_t i = 0; i < count; ++i) {
      scalar_t* to = out + at_token[i] * D;
      const scalar_t* from = in + i * D;
      for (int64_t d = 0; d < D; ++d) to[d] = to[d] + from[d];
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "Every shard's request of one layer call, in one pass");
  m.def("add_rows_at", &add_rows_at, "One answer's rows added to its tokens (the first also zeroes the others)");
}
