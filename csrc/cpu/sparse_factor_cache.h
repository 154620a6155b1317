// Caches of the sparse-precision route, kept for the process. The kernel precision Q is the same
// for every gene and call of a dataset, so its symbolic analysis is done once per pattern, and the
// factorisations of scale Q + shift I that the prior terms and the Laplace systems ask for again
// and again are kept with their results. Matrices are recognised by hashes of their CSR arrays.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/block_cholesky.h"

namespace splisosm {

// The kernel precision Q as read by the kernels (contiguous CSR, checked by check_csr).
struct Csr {
  const int64_t* crow;
  const int64_t* col;
  const double* val;
  int64_t n;
  uint64_t pattern;   // hash of crow and col
  uint64_t identity;  // hash of the pattern and the values: which Q this is
};

// crow, col and val contiguous and checked by check_csr.
Csr csr_view(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val);

// Results for scale Q + shift I by exact (Q, scale, shift), the oldest dropped once their total
// size passes a budget. A gene's prior terms and its Laplace system at one parameter value ask
// for the same matrices (the prior terms twice per Newton step: before and after it), and each
// costs a factorisation. One cache per kind of result for the process, whatever the dataset.
template <typename Value>
class ShiftedCache {
 public:
  explicit ShiftedCache(double budget) : budget_(budget) {}
  bool find(uint64_t matrix, double scale, double shift, Value& out) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = known_.find({matrix, scale, shift});
    if (it == known_.end()) return false;
    out = it->second.first;
    return true;
  }
  void store(uint64_t matrix, double scale, double shift, Value value, double size) {
    std::lock_guard<std::mutex> lock(mutex_);
    const Key key{matrix, scale, shift};
    if (!known_.emplace(key, std::make_pair(std::move(value), size)).second) return;
    order_.push_back(key);
    used_ += size;
    while (used_ > budget_ && order_.size() > 1) {
      const auto it = known_.find(order_.front());
      used_ -= it->second.second;
      known_.erase(it);
      order_.pop_front();
    }
  }

 private:
  using Key = std::tuple<uint64_t, double, double>;
  const double budget_;
  double used_ = 0;
  mutable std::mutex mutex_;
  std::map<Key, std::pair<Value, double>> known_;
  std::deque<Key> order_;  // oldest first
};

// log det(a Q + tau I), counted one each.
ShiftedCache<double>& known_logdets();

// Factors of a Q + tau I kept for their solves, counted in bytes of their panels.
ShiftedCache<std::shared_ptr<const BlockCholesky>>& known_factors();

// Symbolic analyses of Q's pattern (one per pattern and q, shared by every gene and call) with
// a pool of factor objects on each, so a call does not reallocate a factor's panels per thread.
struct CachedPattern {
  std::shared_ptr<const BlockCholeskyPattern> analysis;
  std::mutex mutex;
  std::vector<std::unique_ptr<BlockCholesky>> pool;
};

// The analysis of Q's pattern widened to q x q blocks; the first request for a pattern also
// checks the CSR structure the factorisation relies on.
std::shared_ptr<CachedPattern> cached_pattern(const Csr& Q, int64_t q);

// A factor on a cached pattern, borrowed from its pool for one thread and returned after use.
class PooledFactor {
 public:
  explicit PooledFactor(std::shared_ptr<CachedPattern> pattern);
  ~PooledFactor();
  PooledFactor(const PooledFactor&) = delete;
  PooledFactor& operator=(const PooledFactor&) = delete;

  BlockCholesky& operator*() const { return *factor_; }
  BlockCholesky* operator->() const { return factor_.get(); }

 private:
  std::shared_ptr<CachedPattern> pattern_;
  std::unique_ptr<BlockCholesky> factor_;
};

}  // namespace splisosm
