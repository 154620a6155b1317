// Supernodal (multifrontal) Cholesky factorisation of the Laplace systems of the sparse route.
//
// Every system factorised there has the form
//   A = sum_j scale_j (Q (x) e_j e_j^T) + blockdiag(B_1, ..., B_n),
// with Q the kernel's sparse precision (n x n, shared by all genes), q unknowns per spot (spot
// s owns unknowns s q .. s q + q - 1) and a dense symmetric q x q block B_s per spot. Its pattern
// is Q's with every entry widened to a q x q block, so the symbolic analysis (fill-reducing
// ordering, elimination tree, supernodes) runs once on Q's graph of n spots and serves every
// gene, right-hand side and value of the scales. The numerical work then happens in dense
// frontal matrices, where it runs at dense-kernel speed instead of one sparse entry at a time.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

namespace splisosm {

// Fill-reducing ordering, supernodes and assembly maps of one (Q pattern, q) pair.
class BlockCholeskyPattern {
 public:
  // `crow`/`col`: CSR pattern of the symmetric Q (sorted, unique columns; diagonal present).
  BlockCholeskyPattern(const int64_t* crow, const int64_t* col, int64_t n, int64_t q);

  int64_t supernodes() const { return static_cast<int64_t>(first_.size()) - 1; }
  // Doubles held by one factor's dense panels (what a factorisation stores).
  int64_t factor_size() const { return panel_off_.back(); }
  // Floating-point operations of the dense kernels of one factorisation.
  double flops() const { return flops_; }

 private:
  friend class BlockCholesky;
  // Position of `spot` (elimination order) in supernode s's front, in spots.
  int64_t position(int64_t s, int64_t spot) const;
  double work(int64_t s) const;           // flops of supernode s
  int64_t update_size(int64_t s) const;   // doubles of its update matrix
  int64_t stack_depth(const std::vector<int64_t>& order) const;
  std::vector<std::vector<int64_t>> split(int64_t threads) const;  // subtree roots per worker
  int64_t n_, q_;
  std::vector<int64_t> old_of_;     // spot in the elimination order -> spot of Q
  std::vector<int64_t> new_of_;     // inverse of old_of_
  std::vector<int64_t> first_;      // supernode s spans spots [first_[s], first_[s + 1])
  std::vector<int64_t> sn_of_;      // supernode of each spot (elimination order)
  std::vector<int64_t> row_off_;    // its rows below the diagonal block: rows_[row_off_[s] ..]
  std::vector<int64_t> rows_;       // (elimination order, ascending)
  std::vector<int64_t> rel_;        // per entry of rows_: its position in the parent's front
  std::vector<int64_t> parent_;     // parent supernode, -1 for a root
  std::vector<int64_t> child_off_, child_list_;  // children of s, increasing
  std::vector<int64_t> subtree_first_;  // s's subtree is the supernodes [subtree_first_[s], s]
  std::vector<double> subtree_work_;    // and its flops
  double flops_ = 0;                    // of all supernodes
  std::vector<int64_t> panel_off_;  // offset of the supernode's panel in the factor
  // Q entries to assemble per supernode: index into Q's values, front row, front column
  // (in spots, front row >= front column).
  std::vector<int64_t> asm_off_, asm_src_, asm_row_, asm_col_;
  int64_t max_front_ = 0;  // largest front, in unknowns
  int64_t max_stack_ = 0;  // doubles on the update stack at its deepest
};

// The numerical factor of one system on a shared pattern; one object per thread. Outside a
// parallel region, a factorisation spreads independent subtrees over torch's threads; every
// front still adds its children's updates in one fixed order, so the schedule changes no sum
// (torch's BLAS, used for the largest fronts, may round differently with its own thread count).
class BlockCholesky {
 public:
  explicit BlockCholesky(std::shared_ptr<const BlockCholeskyPattern> pattern);

  // Factorises A for Q's values `qval`, scales (q,) and blocks (n, q, q) in Q's spot order;
  // false if A is not (numerically) positive definite.
  bool factorize(const double* qval, const double* scale, const double* blocks);

  double logdet() const { return logdet_; }

  // Frees what only factorize() and select_inverse() use, for a factor kept for its solves.
  void release_workspace();

  // x <- A^-1 x for `nrhs` vectors of n q unknowns each, stored one after the other. Safe to
  // call from several threads at once on one factor.
  void solve_in_place(double* x, int64_t nrhs) const;

  // Entries of A^-1 on the pattern of the factor (selected inversion), for the traces below.
  void select_inverse();
  // (A^-1)_{uu} summed over all unknowns u.
  double trace_inverse() const;
  // sum over Q's entries (s, t) of Q_st (A^-1)_{s q + j, t q + j}: tr(A^-1 (Q (x) e_j e_j^T)).
  double trace_with(const int64_t* crow, const int64_t* col, const double* qval,
                    int64_t j) const;
  // The q x q diagonal block of A^-1 at spot s (Q's order), row-major into `out`.
  void inverse_block(int64_t s, double* out) const;

 private:
  double inverse_entry(int64_t a, int64_t b, int64_t ja, int64_t jb) const;
  void tiny_solve(int64_t s, double* y, int64_t nrhs, bool transposed) const;

  // A child's rows [from, from + size) of its update matrix go to [to, to + size) of the front.
  struct Run {
    int64_t from, to, size;
  };
  // What one thread of a factorisation works in: the front, and the update stack.
  struct Workspace {
    std::vector<double> front, stack;
    int64_t top = 0;               // end of the used part of stack
    std::vector<int64_t> pending;  // supernodes whose update waits on the stack, in order
    std::vector<Run> runs;
    void reserve(const BlockCholeskyPattern& p, int64_t stack_size);
  };

  bool factor_supernode(int64_t s, Workspace& ws, const double* qval, const double* scale,
                        const double* blocks, const std::vector<const double*>* kept = nullptr);

  std::shared_ptr<const BlockCholeskyPattern> p_;
  std::vector<double> panels_;
  Workspace main_;                  // the sequential factorisation, or the top of the tree
  std::vector<Workspace> workers_;  // the subtrees of a parallel one
  std::vector<double> inv_;         // selected inverse, same layout as panels_
  double logdet_ = 0;
};

}  // namespace splisosm
