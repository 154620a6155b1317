// Caches of the sparse-precision route (see sparse_factor_cache.h).
#include "cpu/sparse_factor_cache.h"

#include <algorithm>

namespace splisosm {
namespace {

uint64_t fnv_hash(const int64_t* a, int64_t len, uint64_t h) {
  for (int64_t i = 0; i < len; ++i) {
    h ^= static_cast<uint64_t>(a[i]);
    h *= 1099511628211ULL;
  }
  return h;
}
constexpr uint64_t kFnvSeed = 14695981039346656037ULL;

struct PatternKey {
  int64_t n, q, nnz;
  uint64_t hash;
  bool operator<(const PatternKey& o) const {
    return std::tie(n, q, nnz, hash) < std::tie(o.n, o.q, o.nnz, o.hash);
  }
};

// Once per pattern: the CSR structure the factorisation relies on (sorted, unique, symmetric).
void check_symmetric_pattern(const int64_t* crow, const int64_t* col, int64_t n) {
  const auto has = [&](int64_t s, int64_t t) {
    return std::binary_search(col + crow[s], col + crow[s + 1], t);
  };
  for (int64_t s = 0; s < n; ++s)
    for (int64_t p = crow[s]; p < crow[s + 1]; ++p) {
      TORCH_CHECK(p == crow[s] || col[p] > col[p - 1], "splisosm: `col` indices must be sorted "
                  "and unique within each row (row ", s, ")");
      TORCH_CHECK(has(col[p], s), "splisosm: the sparse precision must be symmetric; entry (", s,
                  ", ", col[p], ") has no transpose");
    }
}

}  // namespace

Csr csr_view(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val) {
  const int64_t n = crow.numel() - 1;
  static_assert(sizeof(double) == sizeof(int64_t), "hashing doubles by their bits");
  const auto* bits = reinterpret_cast<const int64_t*>(val.data_ptr<double>());
  const uint64_t pattern = fnv_hash(col.data_ptr<int64_t>(), col.numel(),
                                    fnv_hash(crow.data_ptr<int64_t>(), n + 1, kFnvSeed));
  return {crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), val.data_ptr<double>(), n,
          pattern, fnv_hash(bits, val.numel(), pattern)};
}

ShiftedCache<double>& known_logdets() {
  static ShiftedCache<double> cache(4096);
  return cache;
}

ShiftedCache<std::shared_ptr<const BlockCholesky>>& known_factors() {
  static ShiftedCache<std::shared_ptr<const BlockCholesky>> cache(512.0 * (1 << 20));
  return cache;
}

std::shared_ptr<CachedPattern> cached_pattern(const Csr& Q, int64_t q) {
  static std::mutex mutex;
  static std::map<PatternKey, std::shared_ptr<CachedPattern>> cache;
  constexpr size_t kMaxPatterns = 16;
  const int64_t nnz = Q.crow[Q.n];
  const PatternKey key{Q.n, q, nnz, Q.pattern};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  check_symmetric_pattern(Q.crow, Q.col, Q.n);
  auto entry = std::make_shared<CachedPattern>();
  entry->analysis = std::make_shared<const BlockCholeskyPattern>(Q.crow, Q.col, Q.n, q);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= kMaxPatterns) cache.clear();  // rare: many datasets in one process
  return cache.emplace(key, entry).first->second;
}

PooledFactor::PooledFactor(std::shared_ptr<CachedPattern> pattern) : pattern_(std::move(pattern)) {
  {
    std::lock_guard<std::mutex> lock(pattern_->mutex);
    if (!pattern_->pool.empty()) {
      factor_ = std::move(pattern_->pool.back());
      pattern_->pool.pop_back();
    }
  }
  if (!factor_) factor_ = std::make_unique<BlockCholesky>(pattern_->analysis);
}

PooledFactor::~PooledFactor() {
  std::lock_guard<std::mutex> lock(pattern_->mutex);
  pattern_->pool.push_back(std::move(factor_));
}

}  // namespace splisosm
