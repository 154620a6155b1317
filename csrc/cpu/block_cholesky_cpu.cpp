// Supernodal multifrontal Cholesky on Q's graph (see block_cholesky.h).
//
// Symbolic phase, once per (pattern, q): approximate minimum degree ordering of Q's graph,
// elimination tree, its postorder, the structure of each column of the factor, fundamental
// supernodes merged into larger ones where few explicit zeros result (small supernodes waste the
// dense kernels), and the index maps for assembly and extend-add. Numeric phase, per system: in
// postorder, each supernode's frontal matrix receives its entries of A and its children's update
// matrices, the dense diagonal block is factorised, the panel below it is solved, and the Schur
// complement is handed to the parent on a stack.
#include "block_cholesky.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <Eigen/Dense>
#include <Eigen/OrderingMethods>
#include <algorithm>
#include <cmath>

namespace splisosm {
namespace {

using MatX = Eigen::MatrixXd;
using MapMat = Eigen::Map<MatX>;
using ConstMapMat = Eigen::Map<const MatX>;
using RowMatX = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapRowMat = Eigen::Map<RowMatX>;

// Relaxed amalgamation: a child supernode joins its parent while the merged one stays at most
// this many spots wide, or at most kRelaxedWide wide with at most kRelaxedZeros explicit zeros.
constexpr int64_t kAlwaysMerge = 4;
constexpr int64_t kRelaxedWide = 32;
constexpr double kRelaxedZeros = 0.2;
// Fronts with at least this many w m^2 multiply-adds use the BLAS path of partial_cholesky,
// which updates the Schur complement in column blocks of this width.
constexpr double kLibraryFlops = 4e6;
constexpr int64_t kUpdateBlock = 128;
// Fronts of at most this many unknowns go through plain loops: Eigen's blocked kernels cost more
// to set up than the arithmetic of a front this small, and most fronts of a spot graph are this
// small at q = 1 (a factorisation of 10,000 spots at q = 1: 3.7 -> 3.2 ms).
constexpr int64_t kTinyFront = 24;
// Tree-parallel factorisation (one system, several threads): subtrees are balanced to within
// this factor of an even share, after at most this many splits, for patterns with at least
// kParallelWork flops.
constexpr double kBalance = 1.15;
constexpr int64_t kMaxSplits = 64;
constexpr double kParallelWork = 5e6;

// Approximate minimum degree ordering of Q's graph: old_of[new] = old.
std::vector<int64_t> amd_order(const int64_t* crow, const int64_t* col, int64_t n) {
  using SpMat = Eigen::SparseMatrix<double, Eigen::ColMajor, int>;
  std::vector<Eigen::Triplet<double, int>> entries;
  entries.reserve(crow[n]);
  for (int64_t s = 0; s < n; ++s)
    for (int64_t p = crow[s]; p < crow[s + 1]; ++p)
      entries.emplace_back(static_cast<int>(col[p]), static_cast<int>(s), 1.0);
  SpMat pattern(n, n);
  pattern.setFromTriplets(entries.begin(), entries.end());
  Eigen::PermutationMatrix<Eigen::Dynamic, Eigen::Dynamic, int> pinv;
  Eigen::AMDOrdering<int>()(pattern, pinv);
  return std::vector<int64_t>(pinv.indices().data(), pinv.indices().data() + n);
}

// partial_cholesky (below) for a tiny front, in plain loops, column by column (right-looking).
bool tiny_partial_cholesky(double* F, int64_t m, int64_t w) {
  for (int64_t k = 0; k < w; ++k) {
    double* ck = F + k * m;
    if (!(ck[k] > 0)) return false;
    ck[k] = std::sqrt(ck[k]);
    const double inv = 1 / ck[k];
    for (int64_t i = k + 1; i < m; ++i) ck[i] *= inv;
    for (int64_t j = k + 1; j < m; ++j) {
      double* cj = F + j * m;
      for (int64_t i = j; i < m; ++i) cj[i] -= ck[i] * ck[j];
    }
  }
  return true;
}

// One step of the multifrontal factorisation on the m x m front F (lower triangle): F11 = L11
// L11^T, F21 <- F21 L11^-T, F22 <- F22 - F21 F21^T. Large fronts, where almost all the
// arithmetic of a factorisation is, go to torch's BLAS and LAPACK, which pick the CPU's widest
// vector kernels at run time (this file is compiled for the baseline instruction set); small
// ones stay in Eigen, where a library call would cost more than the arithmetic. The BLAS path
// also writes parts of F22's upper triangle, which is never read.
bool partial_cholesky(MapMat& F, int64_t w) {
  const int64_t m = F.rows();
  if (m <= kTinyFront) return tiny_partial_cholesky(F.data(), m, w);
  if (double(w) * double(m) * double(m) < kLibraryFlops) {
    auto F11 = F.topLeftCorner(w, w);
    Eigen::LLT<Eigen::Ref<MatX>> llt(F11);
    if (llt.info() != Eigen::Success) return false;
    if (m > w) {
      auto F21 = F.bottomLeftCorner(m - w, w);
      F11.triangularView<Eigen::Lower>().adjoint().solveInPlace<Eigen::OnTheRight>(F21);
      F.bottomRightCorner(m - w, m - w).selfadjointView<Eigen::Lower>().rankUpdate(F21, -1.0);
    }
    return true;
  }
  // column-major F seen as a tensor: element (i, j) at i + j m
  const at::Tensor front = at::from_blob(F.data(), {m, m}, {1, m}, at::dtype(at::kDouble));
  const at::Tensor F11 = front.narrow(0, 0, w).narrow(1, 0, w);
  const auto [L, info] = at::linalg_cholesky_ex(F11);
  if (info.item<int64_t>() != 0) return false;
  F11.copy_(L);
  if (m > w) {
    const at::Tensor F21 = front.narrow(0, w, m - w).narrow(1, 0, w);
    F21.copy_(at::linalg_solve_triangular(L.t(), F21, /*upper=*/true, /*left=*/false));
    // F22's lower triangle by column blocks: a GEMM over the whole block would do twice the
    // multiply-adds the triangle needs.
    const int64_t u = m - w;
    for (int64_t j0 = 0; j0 < u; j0 += kUpdateBlock) {
      const int64_t b = std::min(kUpdateBlock, u - j0);
      front.narrow(0, w + j0, u - j0)
          .narrow(1, w + j0, b)
          .addmm_(F21.narrow(0, j0, u - j0), F21.narrow(0, j0, b).t(), 1.0, -1.0);
    }
  }
  return true;
}

// C <- beta C + alpha op(A) B with op(A) = A or A^T (m x k), B (k x n), all column-major with
// the given leading dimensions; large products through torch's BLAS, as in partial_cholesky.
void product(double* C, int64_t ldc, const double* A, int64_t lda, bool transpose_a,
             const double* B, int64_t ldb, int64_t m, int64_t k, int64_t n, double alpha,
             double beta) {
  using Stride = Eigen::OuterStride<>;
  if (double(m) * double(k) * double(n) < kLibraryFlops) {
    Eigen::Map<MatX, 0, Stride> c(C, m, n, Stride(ldc));
    const Eigen::Map<const MatX, 0, Stride> b(B, k, n, Stride(ldb));
    if (beta == 0)
      c.setZero();
    else if (beta != 1)
      c *= beta;
    if (transpose_a)
      c.noalias() += alpha * Eigen::Map<const MatX, 0, Stride>(A, k, m, Stride(lda)).transpose() * b;
    else
      c.noalias() += alpha * Eigen::Map<const MatX, 0, Stride>(A, m, k, Stride(lda)) * b;
    return;
  }
  const auto opts = at::dtype(at::kDouble);
  // from_blob takes non-const pointers; A and B are only read
  const at::Tensor a = transpose_a
      ? at::from_blob(const_cast<double*>(A), {k, m}, {1, lda}, opts).t()
      : at::from_blob(const_cast<double*>(A), {m, k}, {1, lda}, opts);
  const at::Tensor b = at::from_blob(const_cast<double*>(B), {k, n}, {1, ldb}, opts);
  at::from_blob(C, {m, n}, {1, ldc}, opts).addmm_(a, b, beta, alpha);
}

}  // namespace

BlockCholeskyPattern::BlockCholeskyPattern(const int64_t* crow, const int64_t* col, int64_t n,
                                           int64_t q)
    : n_(n), q_(q) {
  TORCH_CHECK(n >= 1 && q >= 1, "splisosm: a sparse system needs n >= 1 spots and q >= 1");
  // --- ordering: AMD, then the postorder of its elimination tree (same fill, and every subtree
  // occupies consecutive spots, which the supernodes and the update stack rely on)
  const std::vector<int64_t> amd = amd_order(crow, col, n);
  std::vector<int64_t> amd_new(n);
  for (int64_t i = 0; i < n; ++i) amd_new[amd[i]] = i;
  const auto neighbours = [&](int64_t i, const std::vector<int64_t>& old_of,
                              const std::vector<int64_t>& new_of, std::vector<int64_t>& out) {
    out.clear();
    const int64_t s = old_of[i];
    for (int64_t p = crow[s]; p < crow[s + 1]; ++p) out.push_back(new_of[col[p]]);
  };
  std::vector<int64_t> parent(n, -1), ancestor(n, -1), adj;
  for (int64_t i = 0; i < n; ++i) {  // Liu's algorithm with path compression
    neighbours(i, amd, amd_new, adj);
    for (int64_t k : adj) {
      while (k != -1 && k < i) {
        const int64_t next = ancestor[k];
        ancestor[k] = i;
        if (next == -1) parent[k] = i;
        k = next;
      }
    }
  }
  std::vector<int64_t> head(n, -1), next(n, -1), post;
  post.reserve(n);
  for (int64_t i = n - 1; i >= 0; --i)
    if (parent[i] != -1) {
      next[i] = head[parent[i]];
      head[parent[i]] = i;
    }
  std::vector<int64_t> stack;
  for (int64_t root = 0; root < n; ++root) {
    if (parent[root] != -1) continue;
    stack.push_back(root);
    while (!stack.empty()) {
      const int64_t i = stack.back();
      if (head[i] != -1) {
        const int64_t child = head[i];
        head[i] = next[child];
        stack.push_back(child);
      } else {
        post.push_back(i);
        stack.pop_back();
      }
    }
  }
  old_of_.resize(n);
  new_of_.resize(n);
  std::vector<int64_t> tree(n, -1), post_of(n);
  for (int64_t i = 0; i < n; ++i) post_of[post[i]] = i;
  for (int64_t i = 0; i < n; ++i) {
    old_of_[i] = amd[post[i]];
    tree[i] = parent[post[i]] == -1 ? -1 : post_of[parent[post[i]]];
  }
  for (int64_t i = 0; i < n; ++i) new_of_[old_of_[i]] = i;

  // --- structure of each column below the diagonal: its neighbours after it, and its
  // children's structures without itself
  std::vector<std::vector<int64_t>> below(n);
  std::vector<int64_t> mark(n, -1);
  std::vector<std::vector<int64_t>> kids(n);
  for (int64_t i = 0; i < n; ++i)
    if (tree[i] != -1) kids[tree[i]].push_back(i);
  for (int64_t j = 0; j < n; ++j) {
    std::vector<int64_t>& out = below[j];
    mark[j] = j;
    neighbours(j, old_of_, new_of_, adj);
    for (int64_t k : adj)
      if (k > j && mark[k] != j) {
        mark[k] = j;
        out.push_back(k);
      }
    for (int64_t c : kids[j])
      for (int64_t k : below[c])
        if (mark[k] != j) {
          mark[k] = j;
          out.push_back(k);
        }
    std::sort(out.begin(), out.end());
  }

  // --- fundamental supernodes, then relaxed amalgamation (children come before parents)
  std::vector<int64_t> sn_first, sn_last;  // inclusive spot range
  for (int64_t j = 0; j < n; ++j) {
    const bool extends = j > 0 && tree[j - 1] == j && kids[j].size() == 1 &&
                         below[j - 1].size() == below[j].size() + 1;
    if (extends) {
      sn_last.back() = j;
    } else {
      sn_first.push_back(j);
      sn_last.push_back(j);
    }
  }
  const int64_t S0 = static_cast<int64_t>(sn_first.size());
  std::vector<int64_t> sn_of(n);
  for (int64_t s = 0; s < S0; ++s)
    for (int64_t j = sn_first[s]; j <= sn_last[s]; ++j) sn_of[j] = s;
  // entries stored (dense lower trapezoid) and truly non-zero, per supernode
  const auto stored = [&](int64_t first, int64_t last) {
    const int64_t w = last - first + 1, r = static_cast<int64_t>(below[last].size());
    return w * (w + 1) / 2 + w * r;
  };
  std::vector<int64_t> actual(S0, 0);
  for (int64_t s = 0; s < S0; ++s)
    for (int64_t j = sn_first[s]; j <= sn_last[s]; ++j)
      actual[s] += 1 + static_cast<int64_t>(below[j].size());
  std::vector<int64_t> merged_into(S0, -1);
  for (int64_t s = 0; s < S0; ++s) {
    // the supernode ending just before s is a candidate while it is s's child
    while (sn_first[s] > 0) {
      const int64_t c = sn_of[sn_first[s] - 1];
      if (merged_into[c] != -1 || tree[sn_last[c]] < sn_first[s] || tree[sn_last[c]] > sn_last[s])
        break;
      const int64_t w = sn_last[s] - sn_first[c] + 1;
      const double zeros =
          1.0 - double(actual[s] + actual[c]) / double(stored(sn_first[c], sn_last[s]));
      if (!(w <= kAlwaysMerge || (w <= kRelaxedWide && zeros <= kRelaxedZeros))) break;
      merged_into[c] = s;
      actual[s] += actual[c];
      sn_first[s] = sn_first[c];
      for (int64_t j = sn_first[c]; j <= sn_last[c]; ++j) sn_of[j] = s;
    }
  }
  first_.clear();
  std::vector<int64_t> last;
  for (int64_t s = 0; s < S0; ++s)
    if (merged_into[s] == -1) {
      first_.push_back(sn_first[s]);
      last.push_back(sn_last[s]);
    }
  const int64_t S = static_cast<int64_t>(first_.size());
  first_.push_back(n);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = first_[s]; j <= last[s]; ++j) sn_of[j] = s;
  sn_of_ = sn_of;

  // --- rows, panels, parents' relative positions, assembly maps
  row_off_.assign(S + 1, 0);
  panel_off_.assign(S + 1, 0);
  parent_.assign(S, -1);
  for (int64_t s = 0; s < S; ++s) {
    const auto& rows = below[last[s]];
    rows_.insert(rows_.end(), rows.begin(), rows.end());
    row_off_[s + 1] = static_cast<int64_t>(rows_.size());
    const int64_t w = (last[s] - first_[s] + 1) * q, m = w + static_cast<int64_t>(rows.size()) * q;
    panel_off_[s + 1] = panel_off_[s] + m * w;
    max_front_ = std::max(max_front_, m);
    if (!rows.empty()) parent_[s] = sn_of[rows.front()];
  }
  // children in increasing (post)order; subtrees as ranges [subtree_first_[s], s] and their work
  child_off_.assign(S + 1, 0);
  for (int64_t s = 0; s < S; ++s)
    if (parent_[s] != -1) ++child_off_[parent_[s] + 1];
  for (int64_t s = 0; s < S; ++s) child_off_[s + 1] += child_off_[s];
  child_list_.resize(child_off_[S]);
  subtree_first_.resize(S);
  subtree_work_.resize(S);
  {
    std::vector<int64_t> fill(child_off_.begin(), child_off_.end() - 1);
    for (int64_t s = 0; s < S; ++s) {
      if (parent_[s] != -1) child_list_[fill[parent_[s]]++] = s;
      subtree_first_[s] = s;
      subtree_work_[s] = work(s);
      flops_ += work(s);
      for (int64_t e = child_off_[s]; e < child_off_[s + 1]; ++e) {
        subtree_first_[s] = std::min(subtree_first_[s], subtree_first_[child_list_[e]]);
        subtree_work_[s] += subtree_work_[child_list_[e]];
      }
    }
  }
  std::vector<int64_t> all(S);
  for (int64_t s = 0; s < S; ++s) all[s] = s;
  max_stack_ = stack_depth(all);
  rel_.resize(rows_.size());
  for (int64_t s = 0; s < S; ++s)
    for (int64_t p = row_off_[s]; p < row_off_[s + 1]; ++p) {
      const int64_t parent_sn = sn_of[rows_[row_off_[s]]];
      rel_[p] = position(parent_sn, rows_[p]);
    }
  std::vector<std::vector<int64_t>> entries(S);  // (src, row, col) triples
  for (int64_t s = 0; s < n; ++s) {
    const int64_t c = new_of_[s], sn = sn_of[c];
    for (int64_t p = crow[s]; p < crow[s + 1]; ++p) {
      const int64_t t = new_of_[col[p]];
      if (t < c) continue;
      entries[sn].insert(entries[sn].end(), {p, position(sn, t), c - first_[sn]});
    }
  }
  asm_off_.assign(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    for (size_t e = 0; e < entries[s].size(); e += 3) {
      asm_src_.push_back(entries[s][e]);
      asm_row_.push_back(entries[s][e + 1]);
      asm_col_.push_back(entries[s][e + 2]);
    }
    asm_off_[s + 1] = static_cast<int64_t>(asm_src_.size());
  }
}

int64_t BlockCholeskyPattern::position(int64_t s, int64_t spot) const {
  if (spot < first_[s + 1]) return spot - first_[s];
  const auto lo = rows_.begin() + row_off_[s], hi = rows_.begin() + row_off_[s + 1];
  const auto it = std::lower_bound(lo, hi, spot);
  TORCH_CHECK(it != hi && *it == spot, "splisosm: internal error: spot ", spot,
              " is not on the pattern of supernode ", s);
  return (first_[s + 1] - first_[s]) + (it - lo);
}

double BlockCholeskyPattern::work(int64_t s) const {
  const double w = double(first_[s + 1] - first_[s]) * q_;
  const double r = double(row_off_[s + 1] - row_off_[s]) * q_;
  return w * w * w / 3 + w * w * r + w * r * r;  // potrf, trsm, syrk
}

int64_t BlockCholeskyPattern::update_size(int64_t s) const {
  const int64_t u = (row_off_[s + 1] - row_off_[s]) * q_;
  return u * u;
}

// Supernodes factorised in the given (increasing) order on one stack: its deepest point, with the
// updates of supernodes whose parent is not in the sequence left on it.
int64_t BlockCholeskyPattern::stack_depth(const std::vector<int64_t>& order) const {
  std::vector<char> member(supernodes(), 0);
  for (int64_t s : order) member[s] = 1;
  int64_t depth = 0, deepest = 0;
  for (int64_t s : order) {
    for (int64_t e = child_off_[s]; e < child_off_[s + 1]; ++e)
      if (member[child_list_[e]]) depth -= update_size(child_list_[e]);
    depth += update_size(s);
    deepest = std::max(deepest, depth);
  }
  return deepest;
}

// Subtrees for `threads` workers: starting from the roots, the largest subtree is split (its root
// joins the sequential top part, its children become subtrees) until a greedy assignment of the
// subtrees to the workers is balanced within kBalance, or splitting stops paying.
std::vector<std::vector<int64_t>> BlockCholeskyPattern::split(int64_t threads) const {
  const int64_t S = supernodes();
  std::vector<int64_t> trees;
  for (int64_t s = 0; s < S; ++s)
    if (parent_[s] == -1) trees.push_back(s);
  const auto heavier = [&](int64_t a, int64_t b) {
    return subtree_work_[a] != subtree_work_[b] ? subtree_work_[a] > subtree_work_[b] : a < b;
  };
  std::vector<std::vector<int64_t>> bins;
  for (int64_t round = 0; round < kMaxSplits; ++round) {
    std::sort(trees.begin(), trees.end(), heavier);
    bins.assign(threads, {});
    std::vector<double> load(threads, 0.0);
    double total = 0;
    for (int64_t t : trees) {
      const int64_t b = std::min_element(load.begin(), load.end()) - load.begin();
      bins[b].push_back(t);
      load[b] += subtree_work_[t];
      total += subtree_work_[t];
    }
    const double heaviest = *std::max_element(load.begin(), load.end());
    const int64_t top = trees.front();
    if (heaviest <= kBalance * total / threads || child_off_[top + 1] == child_off_[top]) break;
    trees.erase(trees.begin());
    trees.insert(trees.end(), child_list_.begin() + child_off_[top],
                 child_list_.begin() + child_off_[top + 1]);
  }
  for (auto& bin : bins) std::sort(bin.begin(), bin.end());
  return bins;
}

BlockCholesky::BlockCholesky(std::shared_ptr<const BlockCholeskyPattern> pattern)
    : p_(std::move(pattern)) {
  panels_.resize(p_->factor_size());
}

void BlockCholesky::Workspace::reserve(const BlockCholeskyPattern& p, int64_t stack_size) {
  front.resize(p.max_front_ * p.max_front_);
  stack.resize(stack_size);
  top = 0;
  pending.clear();
}

// Assembles supernode s's front from A and its children's updates (a child's kept update where
// `kept` has one, else the top of ws's stack; children in decreasing order either way, so the
// sums do not depend on the schedule), factorises it into the panel and leaves its update on
// ws's stack.
bool BlockCholesky::factor_supernode(int64_t s, Workspace& ws, const double* qval,
                                     const double* scale, const double* blocks,
                                     const std::vector<const double*>* kept) {
  const BlockCholeskyPattern& p = *p_;
  const int64_t q = p.q_;
  const int64_t width = p.first_[s + 1] - p.first_[s], r = p.row_off_[s + 1] - p.row_off_[s];
  const int64_t w = width * q, m = w + r * q;
  MapMat F(ws.front.data(), m, m);
  F.triangularView<Eigen::Lower>().setZero();
  for (int64_t e = p.asm_off_[s]; e < p.asm_off_[s + 1]; ++e) {
    const double value = qval[p.asm_src_[e]];
    const int64_t row = p.asm_row_[e] * q, column = p.asm_col_[e] * q;
    for (int64_t j = 0; j < q; ++j) F(row + j, column + j) += scale[j] * value;
  }
  for (int64_t i = 0; i < width; ++i) {
    const double* B = blocks + p.old_of_[p.first_[s] + i] * q * q;
    for (int64_t k = 0; k < q; ++k)
      for (int64_t j = k; j < q; ++j) F(i * q + j, i * q + k) += B[j * q + k];
  }
  // extend-add. A child's rows land in its parent's front in runs of consecutive positions,
  // added block by block.
  for (int64_t e = p.child_off_[s + 1] - 1; e >= p.child_off_[s]; --e) {
    const int64_t child = p.child_list_[e];
    const int64_t* rel = p.rel_.data() + p.row_off_[child];
    const int64_t rc = p.row_off_[child + 1] - p.row_off_[child], u = rc * q;
    const double* update = kept != nullptr ? (*kept)[child] : nullptr;
    if (update == nullptr) {
      TORCH_CHECK(!ws.pending.empty() && ws.pending.back() == child,
                  "splisosm: internal error: update of supernode ", child, " not on the stack");
      ws.pending.pop_back();
      ws.top -= u * u;
      update = ws.stack.data() + ws.top;
    }
    const ConstMapMat U(update, u, u);
    ws.runs.clear();
    for (int64_t a = 0; a < rc; ++a) {
      if (!ws.runs.empty() && ws.runs.back().to + ws.runs.back().size == rel[a] * q &&
          ws.runs.back().from + ws.runs.back().size == a * q)
        ws.runs.back().size += q;
      else
        ws.runs.push_back({a * q, rel[a] * q, q});
    }
    for (size_t x = 0; x < ws.runs.size(); ++x) {
      const Run& cols = ws.runs[x];
      F.block(cols.to, cols.to, cols.size, cols.size).triangularView<Eigen::Lower>() +=
          U.block(cols.from, cols.from, cols.size, cols.size);
      for (size_t y = x + 1; y < ws.runs.size(); ++y) {
        const Run& rows = ws.runs[y];
        F.block(rows.to, cols.to, rows.size, cols.size) +=
            U.block(rows.from, cols.from, rows.size, cols.size);
      }
    }
  }
  if (!partial_cholesky(F, w)) return false;
  if (r > 0) {  // the lower triangle of the update matrix onto the stack
    const int64_t u = m - w;
    MapMat(ws.stack.data() + ws.top, u, u).triangularView<Eigen::Lower>() =
        F.bottomRightCorner(u, u);
    ws.top += u * u;
    ws.pending.push_back(s);
  }
  MapMat(panels_.data() + p.panel_off_[s], m, w) = F.leftCols(w);
  return true;
}

bool BlockCholesky::factorize(const double* qval, const double* scale, const double* blocks) {
  const BlockCholeskyPattern& p = *p_;
  const int64_t S = p.supernodes();
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  bool ok = true;
  if (threads < 2 || p.flops() < kParallelWork) {
    main_.reserve(p, p.max_stack_);
    for (int64_t s = 0; s < S && ok; ++s) ok = factor_supernode(s, main_, qval, scale, blocks);
  } else {
    // Subtrees in parallel, each worker on its own stack, where the updates of its subtrees'
    // roots stay for the sequential top part.
    const auto bins = p.split(threads);
    std::vector<const double*> kept(S, nullptr);
    std::vector<char> in_subtree(S, 0);
    std::vector<std::vector<int64_t>> orders(bins.size());
    for (size_t b = 0; b < bins.size(); ++b)
      for (int64_t root : bins[b])
        for (int64_t s = p.subtree_first_[root]; s <= root; ++s) {
          orders[b].push_back(s);
          in_subtree[s] = 1;
        }
    workers_.resize(bins.size());
    std::vector<char> worker_ok(bins.size(), 1);
    at::parallel_for(0, static_cast<int64_t>(bins.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        Workspace& ws = workers_[b];
        ws.reserve(p, p.stack_depth(orders[b]));
        for (int64_t s : orders[b]) {
          if (!factor_supernode(s, ws, qval, scale, blocks)) {
            worker_ok[b] = 0;
            break;
          }
        }
      }
    });
    for (size_t b = 0; b < bins.size(); ++b) {
      ok = ok && worker_ok[b];
      int64_t offset = 0;  // the roots' updates, in the order they were left on the stack
      for (int64_t s : workers_[b].pending) {
        kept[s] = workers_[b].stack.data() + offset;
        offset += p.update_size(s);
      }
    }
    std::vector<int64_t> top;
    for (int64_t s = 0; s < S; ++s)
      if (!in_subtree[s]) top.push_back(s);
    main_.reserve(p, p.stack_depth(top));
    for (size_t i = 0; i < top.size() && ok; ++i)
      ok = factor_supernode(top[i], main_, qval, scale, blocks, &kept);
  }
  if (!ok) return false;
  logdet_ = 0;  // in supernode order, whatever the schedule
  for (int64_t s = 0; s < S; ++s) {
    const int64_t w = (p.first_[s + 1] - p.first_[s]) * p.q_;
    const int64_t m = w + (p.row_off_[s + 1] - p.row_off_[s]) * p.q_;
    logdet_ += 2 * ConstMapMat(panels_.data() + p.panel_off_[s], m, w)
                       .topRows(w).diagonal().array().log().sum();
  }
  return std::isfinite(logdet_);
}

void BlockCholesky::release_workspace() {
  main_ = Workspace();
  workers_.clear();
  std::vector<double>().swap(inv_);
}

// One tiny supernode's part of a solve with L (forward) or L^T (backward), in plain loops as its
// factorisation: y holds the unknowns in elimination order, one row of nrhs values each.
void BlockCholesky::tiny_solve(int64_t s, double* y, int64_t nrhs, bool transposed) const {
  const BlockCholeskyPattern& p = *p_;
  const int64_t q = p.q_, w = (p.first_[s + 1] - p.first_[s]) * q;
  const int64_t r = p.row_off_[s + 1] - p.row_off_[s], m = w + r * q;
  const double* L = panels_.data() + p.panel_off_[s];
  const int64_t* rows = p.rows_.data() + p.row_off_[s];
  double* ys = y + p.first_[s] * q * nrhs;
  const auto below = [&](int64_t a, int64_t j) { return y + (rows[a] * q + j) * nrhs; };
  if (!transposed) {
    for (int64_t k = 0; k < w; ++k) {
      const double* lk = L + k * m;
      double* yk = ys + k * nrhs;
      for (int64_t c = 0; c < nrhs; ++c) yk[c] /= lk[k];
      for (int64_t i = k + 1; i < w; ++i)
        for (int64_t c = 0; c < nrhs; ++c) ys[i * nrhs + c] -= lk[i] * yk[c];
      for (int64_t a = 0; a < r; ++a)
        for (int64_t j = 0; j < q; ++j)
          for (int64_t c = 0; c < nrhs; ++c) below(a, j)[c] -= lk[w + a * q + j] * yk[c];
    }
    return;
  }
  for (int64_t k = w - 1; k >= 0; --k) {
    const double* lk = L + k * m;
    double* yk = ys + k * nrhs;
    for (int64_t a = 0; a < r; ++a)
      for (int64_t j = 0; j < q; ++j)
        for (int64_t c = 0; c < nrhs; ++c) yk[c] -= lk[w + a * q + j] * below(a, j)[c];
    for (int64_t i = k + 1; i < w; ++i)
      for (int64_t c = 0; c < nrhs; ++c) yk[c] -= lk[i] * ys[i * nrhs + c];
    for (int64_t c = 0; c < nrhs; ++c) yk[c] /= lk[k];
  }
}

void BlockCholesky::solve_in_place(double* x, int64_t nrhs) const {
  const BlockCholeskyPattern& p = *p_;
  const int64_t q = p.q_, n = p.n_, S = p.supernodes(), N = n * q;
  // Unknowns in elimination order, one row each with all right-hand sides side by side, so the
  // rows a supernode gathers and scatters are contiguous.
  std::vector<double> work(static_cast<size_t>(N * nrhs)), gather;  // callers may share *this
  MapRowMat y(work.data(), N, nrhs);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < q; ++j)
      for (int64_t c = 0; c < nrhs; ++c) y(i * q + j, c) = x[c * N + p.old_of_[i] * q + j];
  for (int64_t s = 0; s < S; ++s) {  // L y = b
    const int64_t w = (p.first_[s + 1] - p.first_[s]) * q, r = p.row_off_[s + 1] - p.row_off_[s];
    if (w + r * q <= kTinyFront) {
      tiny_solve(s, work.data(), nrhs, /*transposed=*/false);
      continue;
    }
    const ConstMapMat L(panels_.data() + p.panel_off_[s], w + r * q, w);
    auto ys = y.middleRows(p.first_[s] * q, w);
    L.topRows(w).triangularView<Eigen::Lower>().solveInPlace(ys);
    if (r == 0) continue;
    gather.resize(static_cast<size_t>(r * q * nrhs));
    MapRowMat t(gather.data(), r * q, nrhs);
    t.noalias() = L.bottomRows(r * q) * ys;
    const int64_t* rows = p.rows_.data() + p.row_off_[s];
    for (int64_t a = 0; a < r; ++a) y.middleRows(rows[a] * q, q) -= t.middleRows(a * q, q);
  }
  for (int64_t s = S - 1; s >= 0; --s) {  // L^T x = y
    const int64_t w = (p.first_[s + 1] - p.first_[s]) * q, r = p.row_off_[s + 1] - p.row_off_[s];
    if (w + r * q <= kTinyFront) {
      tiny_solve(s, work.data(), nrhs, /*transposed=*/true);
      continue;
    }
    const ConstMapMat L(panels_.data() + p.panel_off_[s], w + r * q, w);
    auto ys = y.middleRows(p.first_[s] * q, w);
    if (r > 0) {
      gather.resize(static_cast<size_t>(r * q * nrhs));
      MapRowMat t(gather.data(), r * q, nrhs);
      const int64_t* rows = p.rows_.data() + p.row_off_[s];
      for (int64_t a = 0; a < r; ++a) t.middleRows(a * q, q) = y.middleRows(rows[a] * q, q);
      ys.noalias() -= L.bottomRows(r * q).transpose() * t;
    }
    L.topRows(w).triangularView<Eigen::Lower>().adjoint().solveInPlace(ys);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < q; ++j)
      for (int64_t c = 0; c < nrhs; ++c) x[c * N + p.old_of_[i] * q + j] = y(i * q + j, c);
}

// Supernode by supernode from the last, with Y = L21 L11^-1 and Z22 the (already computed)
// inverse on the supernode's rows: Z21 = -Z22 Y and Z11 = L11^-T L11^-1 + Y^T Z22 Y. The rows
// of a supernode form a clique of the filled graph, so Z22 lies on the pattern of later panels.
void BlockCholesky::select_inverse() {
  const BlockCholeskyPattern& p = *p_;
  const int64_t q = p.q_, S = p.supernodes();
  inv_.assign(panels_.size(), 0.0);
  MatX Y, Z22, Linv;
  for (int64_t s = S - 1; s >= 0; --s) {
    const int64_t w = (p.first_[s + 1] - p.first_[s]) * q, r = p.row_off_[s + 1] - p.row_off_[s];
    const int64_t rq = r * q;
    const ConstMapMat L(panels_.data() + p.panel_off_[s], w + rq, w);
    MapMat Z(inv_.data() + p.panel_off_[s], w + rq, w);
    const int64_t ld = w + rq;
    Linv = L.topRows(w).triangularView<Eigen::Lower>().solve(MatX::Identity(w, w));
    product(Z.data(), ld, Linv.data(), w, true, Linv.data(), w, w, w, w, 1.0, 0.0);
    if (r == 0) continue;
    Y = L.bottomRows(rq);
    L.topRows(w).triangularView<Eigen::Lower>().solveInPlace<Eigen::OnTheRight>(Y);
    Z22.resize(rq, rq);
    const int64_t* rows = p.rows_.data() + p.row_off_[s];
    for (int64_t b = 0; b < r; ++b) {
      const int64_t t = p.sn_of_[rows[b]], cb = rows[b] - p.first_[t];
      const int64_t wt = p.first_[t + 1] - p.first_[t];
      const ConstMapMat Zt(inv_.data() + p.panel_off_[t],
                           (wt + p.row_off_[t + 1] - p.row_off_[t]) * q, wt * q);
      const int64_t* trow = p.rows_.data() + p.row_off_[t];
      // rows a >= b of column b, copied in runs that are consecutive in t's panel too
      int64_t k = 0;  // walks t's rows alongside ours (both ascending)
      const auto position = [&](int64_t a) {
        if (rows[a] < p.first_[t + 1]) return rows[a] - p.first_[t];
        while (trow[k] < rows[a]) ++k;
        return wt + k;
      };
      for (int64_t a = b; a < r;) {
        const int64_t start = a, pos = position(a);
        while (++a < r && position(a) == pos + (a - start)) {
        }
        Z22.block(start * q, b * q, (a - start) * q, q) =
            Zt.block(pos * q, cb * q, (a - start) * q, q);
      }
    }
    Z22.triangularView<Eigen::StrictlyUpper>() = Z22.transpose();
    product(Z.data() + w, ld, Z22.data(), rq, false, Y.data(), rq, rq, rq, w, -1.0, 0.0);
    product(Z.data(), ld, Y.data(), rq, true, Z.data() + w, ld, w, rq, w, -1.0, 1.0);
  }
}

double BlockCholesky::inverse_entry(int64_t a, int64_t b, int64_t ja, int64_t jb) const {
  const BlockCholeskyPattern& p = *p_;
  const int64_t q = p.q_;
  int64_t i = p.new_of_[a], k = p.new_of_[b];
  if (i < k) {
    std::swap(i, k);
    std::swap(ja, jb);
  }
  const int64_t t = p.sn_of_[k], wt = p.first_[t + 1] - p.first_[t];
  const int64_t m = (wt + p.row_off_[t + 1] - p.row_off_[t]) * q;
  return inv_[p.panel_off_[t] + ((k - p.first_[t]) * q + jb) * m + p.position(t, i) * q + ja];
}

double BlockCholesky::trace_inverse() const {
  const BlockCholeskyPattern& p = *p_;
  const int64_t q = p.q_;
  double sum = 0;
  for (int64_t s = 0; s < p.supernodes(); ++s) {
    const int64_t w = (p.first_[s + 1] - p.first_[s]) * q;
    const int64_t m = w + (p.row_off_[s + 1] - p.row_off_[s]) * q;
    sum += ConstMapMat(inv_.data() + p.panel_off_[s], m, w).topRows(w).trace();
  }
  return sum;
}

double BlockCholesky::trace_with(const int64_t* crow, const int64_t* col, const double* qval,
                                 int64_t j) const {
  double sum = 0;
  for (int64_t s = 0; s < p_->n_; ++s)
    for (int64_t e = crow[s]; e < crow[s + 1]; ++e) sum += qval[e] * inverse_entry(s, col[e], j, j);
  return sum;
}

void BlockCholesky::inverse_block(int64_t s, double* out) const {
  const int64_t q = p_->q_;
  for (int64_t j = 0; j < q; ++j)
    for (int64_t k = 0; k < q; ++k) out[j * q + k] = inverse_entry(s, s, j, k);
}

}  // namespace splisosm
