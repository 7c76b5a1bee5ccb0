#include "kv_pool.h"

#include <algorithm>
#include <exception>
#include <map>

#include "errors.h"

namespace lckv {

namespace {
int pagesFor(int tokens, int pageTokens) { return (tokens + pageTokens - 1) / pageTokens; }

EngineError poolFull(int need, int available, const KvLayout& l) {
  return EngineError(kErrKvCacheFull, "the K/V cache is full: " + std::to_string(need) + " more pages of " +
                                          std::to_string(l.pageTokens) + " tokens are needed, " +
                                          std::to_string(std::max(available, 0)) + " are available");
}
}  // namespace

KvPool::KvPool(Backend& backend, const KvLayout& layout, int numPages) : backend_(backend), layout_(layout) {
  if (numPages <= 0 || layout.pageTokens <= 0 || layout.slots <= 0 || layout.kvDim <= 0)
    throw EngineError(kErrInvalidArgument, "a K/V pool needs at least one page, one slot and one token per page");
  if (layout.pageTokens & (layout.pageTokens - 1))
    throw EngineError(kErrInvalidArgument, "K/V page size must be a power of two, got " + std::to_string(layout.pageTokens));
  if (layout.kvHeads <= 0 || layout.kvDim % layout.kvHeads)
    throw EngineError(kErrInvalidArgument, "a K/V pool's kvDim (" + std::to_string(layout.kvDim) + ") must be a multiple of its kvHeads (" +
                                               std::to_string(layout.kvHeads) + ")");
  const std::string headDimProblem = kvHeadDimProblem(layout.type, layout.headDim());
  if (!headDimProblem.empty()) throw EngineError(kErrInvalidArgument, "the K/V cache type " + headDimProblem);
  if (kvTypeChannelKeys(layout.type) && layout.residualParts() == 0)
    throw EngineError(kErrInvalidArgument, std::string("the K/V cache type ") + kvTypeName(layout.type) + " needs pages of at least 4 tokens, not " +
                                               std::to_string(layout.pageTokens));
  storage_ = backend.alloc(numPages, layout.pageBytes() / 4);  // pageBytes is a multiple of 16
  refs_.assign((size_t)numPages, 0);
  cachedRefs_.assign((size_t)numPages, 0);
  free_.reserve((size_t)numPages);
  for (int p = numPages - 1; p >= 0; --p) free_.push_back(p);  // page 0 is taken first
}

std::vector<int32_t> KvPool::take(int count) {
  std::vector<int32_t> out;
  out.reserve((size_t)count);  // the only allocation: before any page leaves the free list
  takeInto(count, out);
  return out;
}

void KvPool::takeInto(int count, std::vector<int32_t>& out) {
  for (int i = 0; i < count; ++i) {
    const int32_t p = free_.back();
    free_.pop_back();
    refs_[(size_t)p] = 1;
    out.push_back(p);
  }
}

std::exception_ptr KvPool::copyPages(const std::vector<std::pair<int32_t, int32_t>>& copies) {
  try {
    for (auto [from, to] : copies) backend_.copyRows(storage_, from, storage_, to, 1);
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

void KvPool::release(int32_t page) {
  if (--refs_[(size_t)page] == 0) free_.push_back(page);
}

KvPoolStats KvPool::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  KvPoolStats s;
  s.pageTokens = layout_.pageTokens;
  s.pagesTotal = (int)refs_.size();
  s.pagesFree = (int)free_.size();
  s.pagesUsed = s.pagesTotal - s.pagesFree;
  s.pagesReserved = reservedTotal_;
  s.pageBytes = layout_.pageBytes();
  s.residualPages = layout_.residualParts();
  for (size_t p = 0; p < refs_.size(); ++p) {
    if (refs_[p] > 0 && cachedRefs_[p] == refs_[p]) ++s.pagesCached;
    if (refs_[p] > 1) s.sharedRefs += refs_[p] - 1;
  }
  return s;
}

std::string KvPool::audit() const {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<int> refs(refs_.size(), 0), cached(refs_.size(), 0);
  int reserved = 0;
  for (const KvPages* h : holders_) {
    reserved += h->reserved_;
    std::vector<int32_t> held = h->table_;
    held.insert(held.end(), h->residual_.begin(), h->residual_.end());
    for (int32_t p : held) {
      if (p == -1) continue;  // released by a sliding window
      if (p < 0 || (size_t)p >= refs.size()) return "a page table holds page " + std::to_string(p) + ", outside the pool";
      ++refs[(size_t)p];
      if (h->cached_) ++cached[(size_t)p];
    }
  }
  if (reserved != reservedTotal_)
    return "reservations add up to " + std::to_string(reserved) + " pages, the pool counts " + std::to_string(reservedTotal_);
  // Reserved pages stay free: a promise the free list cannot keep is a request that will find the
  // pool full halfway through.
  if ((size_t)reservedTotal_ > free_.size())
    return std::to_string(reservedTotal_) + " pages are reserved but only " + std::to_string(free_.size()) + " are free";
  size_t unreferenced = 0;
  for (size_t p = 0; p < refs.size(); ++p) {
    if (refs[p] != refs_[p])
      return "page " + std::to_string(p) + " has " + std::to_string(refs_[p]) + " references, the page tables hold " +
             std::to_string(refs[p]);
    if (cached[p] != cachedRefs_[p]) return "page " + std::to_string(p) + " has a wrong prefix-cache count";
    if (refs[p] == 0) ++unreferenced;
  }
  if (unreferenced != free_.size())
    return std::to_string(unreferenced) + " pages are unreferenced but " + std::to_string(free_.size()) + " are free";
  std::vector<int32_t> f = free_;
  std::sort(f.begin(), f.end());
  if (std::adjacent_find(f.begin(), f.end()) != f.end()) return "a page is on the free list twice";
  return "";
}

KvPages::KvPages(std::shared_ptr<KvPool> pool) : pool_(std::move(pool)) {
  std::lock_guard<std::mutex> lk(pool_->mu_);
  pool_->holders_.insert(this);
}

void KvPages::dropLocked(int32_t page) {
  if (page < 0) return;  // released by a sliding window
  if (cached_) --pool_->cachedRefs_[(size_t)page];
  pool_->release(page);
}

void KvPages::holdLocked(int32_t page) {
  if (cached_) ++pool_->cachedRefs_[(size_t)page];
}

KvPages::~KvPages() {
  std::lock_guard<std::mutex> lk(pool_->mu_);
  for (int32_t p : table_) dropLocked(p);
  for (int32_t p : residual_) dropLocked(p);
  pool_->reservedTotal_ -= reserved_;
  pool_->holders_.erase(this);
}

std::unique_ptr<KvPages> KvPages::share() const {
  auto out = std::make_unique<KvPages>(pool_);
  std::lock_guard<std::mutex> lk(pool_->mu_);
  for (int32_t p : table_)
    if (p >= 0) ++pool_->refs_[(size_t)p];
  for (int32_t p : residual_) ++pool_->refs_[(size_t)p];
  out->table_ = table_;
  out->residual_ = residual_;
  out->residualPage_ = residualPage_;
  out->dropped_ = dropped_;
  return out;
}

void KvPages::keep(int n) { keepPages((size_t)pagesFor(std::max(n, 0), pool_->layout_.pageTokens)); }

void KvPages::keepPages(size_t pages) {
  std::lock_guard<std::mutex> lk(pool_->mu_);
  while (table_.size() > pages) {
    dropLocked(table_.back());
    table_.pop_back();
  }
  dropped_ = std::min(dropped_, (int)table_.size());
  if (pages == 0) {  // an empty sequence needs no residual until it writes again
    for (int32_t p : residual_) dropLocked(p);
    residual_.clear();
    residualPage_ = -1;
  }
}

bool KvPages::residualShared() const {
  std::lock_guard<std::mutex> lk(pool_->mu_);
  return residualSharedLocked();
}

bool KvPages::residualStale(int start) const {
  const int P = pool_->layout_.pageTokens;
  return kvTypeChannelKeys(pool_->layout_.type) && start % P != 0 && residualPage_ != start / P;
}

int KvPages::exactRewind(int n) const {
  const int P = pool_->layout_.pageTokens;
  return residualStale(n) ? n / P * P : n;
}

bool KvPages::residualMissingLocked() const { return pool_->layout_.residualParts() > 0 && residual_.empty(); }

bool KvPages::residualSharedLocked() const {
  for (int32_t p : residual_)
    if (pool_->refs_[(size_t)p] > 1) return true;
  return false;
}

void KvPages::erasePages(int first, int count) {
  std::lock_guard<std::mutex> lk(pool_->mu_);
  if (first < 0 || count < 0 || (size_t)(first + count) > table_.size())
    throw EngineError(kErrInvalidArgument, "erasePages: range outside the page table");
  eraseLocked(first, count);
}

void KvPages::eraseLocked(int first, int count) {
  for (int i = first; i < first + count; ++i) dropLocked(table_[(size_t)i]);
  table_.erase(table_.begin() + first, table_.begin() + first + count);
  dropped_ -= std::max(0, std::min(dropped_, first + count) - first);  // released entries among the erased
  // The residual's page moves down with the later pages; one among the erased holds nothing.
  if (residualPage_ >= first + count) residualPage_ -= count;
  else if (residualPage_ >= first) residualPage_ = -1;
}

void KvPages::shiftCountsLocked(int first, int count, int length, std::vector<int>& shared, int& freed) const {
  const int end = std::min((int)table_.size(), pagesFor(std::max(length, 0), pool_->layout_.pageTokens));
  if (first < 0 || count < 0 || first + count > end)
    throw EngineError(kErrInvalidArgument, "shiftPages: range outside the page table");
  freed = 0;
  for (int i = first; i < first + count; ++i)
    if (table_[(size_t)i] >= 0 && pool_->refs_[(size_t)table_[(size_t)i]] == 1) ++freed;
  shared.clear();
  for (int i = first + count; i < end; ++i) {
    if (table_[(size_t)i] < 0)
      throw EngineError(kErrInvalidArgument, "shiftPages: a moved page was released by the sliding window");
    if (pool_->refs_[(size_t)table_[(size_t)i]] > 1) shared.push_back(i);
  }
}

int KvPages::pagesToShift(int first, int count, int length) const {
  std::lock_guard<std::mutex> lk(pool_->mu_);
  std::vector<int> shared;
  int freed = 0;
  shiftCountsLocked(first, count, length, shared, freed);
  return std::max(0, (int)shared.size() - freed);
}

void KvPages::shiftPages(int first, int count, int length) {
  KvPool& pool = *pool_;
  std::unique_lock<std::mutex> lk(pool.mu_);
  std::vector<int> shared;
  int freed = 0;
  shiftCountsLocked(first, count, length, shared, freed);
  // The moved keys are rewritten through the residual (a channel-key type): it is copied too.
  const bool residualCopy = residualSharedLocked();
  const int need = (int)shared.size() + (residualCopy ? (int)residual_.size() : 0);
  const int available = pool.available(reserved_) + freed;
  if (need > available) throw poolFull(need, available, pool.layout_);
  // The release's pages and the unreserved free ones first; the reservation covers the rest.
  // (prepareWrite spends the reservation first, since it was made for those very writes; the
  // caller of a shift replaces what is left of its reservation right after it.)
  const int unreserved = (int)pool.free_.size() + freed - pool.reservedTotal_;
  const int fromReservation = std::min(reserved_, std::max(0, need - std::max(0, unreserved)));
  // Allocations first, so nothing below can throw once pages and counts start to move.
  std::vector<std::pair<int32_t, int32_t>> copy;  // (from, to)
  copy.reserve((size_t)need);
  std::vector<int32_t> fresh;
  fresh.reserve((size_t)need);
  eraseLocked(first, count);
  pool.takeInto(need, fresh);
  reserved_ -= fromReservation;
  pool.reservedTotal_ -= fromReservation;
  // As in prepareWrite: the table keeps its reference to each shared page until it is copied.
  for (size_t c = 0; c < shared.size(); ++c) {
    const size_t i = (size_t)(shared[c] - count);
    copy.emplace_back(table_[i], fresh[c]);
    holdLocked(fresh[c]);
    table_[i] = fresh[c];
  }
  if (residualCopy)
    for (size_t c = 0; c < residual_.size(); ++c) {
      const int32_t now = fresh[shared.size() + c];
      copy.emplace_back(residual_[c], now);
      holdLocked(now);
      residual_[c] = now;
    }
  lk.unlock();
  const std::exception_ptr failure = pool.copyPages(copy);
  std::lock_guard<std::mutex> relock(pool.mu_);
  for (auto [from, to] : copy) dropLocked(from);  // the copy stands in for it; its other holders keep it
  if (failure) {
    // Pages past `first` may hold uncopied K/V now: the sequence keeps only what precedes them.
    for (size_t i = (size_t)first; i < table_.size(); ++i) dropLocked(table_[i]);
    table_.resize((size_t)first);
    std::rethrow_exception(failure);
  }
}

int KvPages::firstHeld() const { return dropped_ * pool_->layout_.pageTokens; }

bool KvPages::writableInPlace(int pos) const {
  const int i = pos / pool_->layout_.pageTokens;
  if (pos < 0 || i >= (int)table_.size() || table_[(size_t)i] < 0) return false;
  std::lock_guard<std::mutex> lk(pool_->mu_);
  if (pool_->layout_.residualParts() > 0 && (residual_.empty() || residualSharedLocked() || residualPage_ != i)) return false;
  return pool_->refs_[(size_t)table_[(size_t)i]] == 1;
}

void KvPages::releaseBelow(int pos) {
  const int pages = std::min((int)table_.size(), std::max(0, pos) / pool_->layout_.pageTokens);
  if (pages <= dropped_) return;
  std::lock_guard<std::mutex> lk(pool_->mu_);
  const size_t freeBefore = pool_->free_.size();
  for (int i = dropped_; i < pages; ++i) {
    dropLocked(table_[(size_t)i]);
    table_[(size_t)i] = -1;
  }
  dropped_ = pages;
  if (windowPages_ > 0) {
    // Pages that went back to the pool (not those another holder keeps) refill the promise, up
    // to the window's pages and to the new pages growth to the reserved total still takes.
    const int freed = (int)(pool_->free_.size() - freeBefore);
    const int ahead = std::max(0, pagesFor(reservedTarget_, pool_->layout_.pageTokens) - (int)table_.size());
    const int want = std::min(ahead, std::max(0, windowPages_ - ownPagesLocked()));
    const int refill = std::min(freed, std::max(0, want - reserved_));
    reserved_ += refill;
    pool_->reservedTotal_ += refill;
  }
}

int KvPages::pagesToGrow(int length, int total) const {
  if (total <= length) return 0;
  const int P = pool_->layout_.pageTokens;
  std::lock_guard<std::mutex> lk(pool_->mu_);
  int need = residualMissingLocked() || residualSharedLocked() ? pool_->layout_.residualParts() : 0;
  for (int i = length / P; i < pagesFor(total, P); ++i) {
    if ((size_t)i >= table_.size()) ++need;
    else if (table_[(size_t)i] < 0) ++need;  // released by a sliding window (prepareWrite refuses it)
    else if (pool_->refs_[(size_t)table_[(size_t)i]] > 1) ++need;  // shared: copied before the write
  }
  return need;
}

int KvPages::ownPagesLocked() const {
  int own = 0;
  for (int32_t p : table_)
    if (p >= 0 && pool_->refs_[(size_t)p] == 1) ++own;
  for (int32_t p : residual_)
    if (pool_->refs_[(size_t)p] == 1) ++own;
  return own;
}

int KvPages::pagesToReserve(int length, int total, int extra, Growth growth) const {
  const int grow = pagesToGrow(length, total);
  if (growth.windowPages <= 0) return grow + std::max(0, extra);
  const int prefill = pagesToGrow(length, std::min(total, growth.decodeFrom));
  std::lock_guard<std::mutex> lk(pool_->mu_);
  // Shared pages do not count as held: the copy-on-write of one takes a page, and releasing one
  // returns none.
  const int decode = std::min(grow, std::max(0, growth.windowPages - ownPagesLocked()));
  return std::max(prefill, decode) + std::max(0, extra);
}

void KvPages::reserve(int length, int total, int extra, Growth growth) {
  const int need = pagesToReserve(length, total, extra, growth);
  std::lock_guard<std::mutex> lk(pool_->mu_);
  const int available = pool_->available(reserved_);
  if (need > available) throw poolFull(need, available, pool_->layout_);
  pool_->reservedTotal_ += need - reserved_;
  reserved_ = need;
  reservedTarget_ = total;
  windowPages_ = total > length ? growth.windowPages : 0;  // reserve(0) at the end of a request stops the refills
}

void KvPages::setCached(bool cached) {
  std::lock_guard<std::mutex> lk(pool_->mu_);
  if (cached == cached_) return;
  for (int32_t p : table_)
    if (p >= 0) pool_->cachedRefs_[(size_t)p] += cached ? 1 : -1;
  for (int32_t p : residual_) pool_->cachedRefs_[(size_t)p] += cached ? 1 : -1;
  cached_ = cached;
}

void KvPages::prepareWrite(int start, int n) {
  if (pagesBeforeWrite_ < 0) pagesBeforeWrite_ = (int)table_.size();
  if (n <= 0) return;
  KvPool& pool = *pool_;
  const int P = pool.layout_.pageTokens;
  const int first = start / P, last = pagesFor(start + n, P);  // page indices [first, last)
  std::vector<int> copies;  // indices of shared pages in the write range
  std::unique_lock<std::mutex> lk(pool.mu_);
  int missing = std::max(0, last - (int)table_.size());
  for (int i = first; i < std::min(last, (int)table_.size()); ++i) {
    if (table_[(size_t)i] < 0)
      throw EngineError(kErrInvalidArgument, "a write at position " + std::to_string(i * P) +
                                                 " would land in a page the sliding window already released");
    if (pool.refs_[(size_t)table_[(size_t)i]] > 1) copies.push_back(i);
  }
  // A channel-key type writes through the residual: taken at the first write, copied if shared.
  const bool residualNew = residualMissingLocked(), residualCopy = residualSharedLocked();
  const int residualNeed = residualNew || residualCopy ? pool.layout_.residualParts() : 0;
  const int need = missing + (int)copies.size() + residualNeed;
  if (need == 0) return;
  const int available = pool.available(reserved_);
  if (need > available) throw poolFull(need, available, pool.layout_);
  // Allocations first, so nothing below can throw once pages and counts start to move.
  std::vector<std::pair<int32_t, int32_t>> copy;  // (from, to)
  copy.reserve(copies.size() + (size_t)residualNeed);
  table_.reserve((size_t)last);
  residual_.reserve((size_t)pool.layout_.residualParts());
  std::vector<int32_t> fresh = pool.take(need);
  const int fromReservation = std::min(reserved_, need);
  reserved_ -= fromReservation;
  pool.reservedTotal_ -= fromReservation;
  takenFromReservation_ += fromReservation;
  // Copy-on-write: the new page starts as a copy of the shared one. This table keeps its
  // reference to the shared page until the copy is made (below), so that another holder letting
  // go meanwhile cannot free a page being read.
  size_t next = 0;
  for (int i : copies) {
    const int32_t old = table_[(size_t)i], now = fresh[next++];
    copy.emplace_back(old, now);
    holdLocked(now);
    table_[(size_t)i] = now;
  }
  while ((int)table_.size() < last) {
    const int32_t now = fresh[next++];
    holdLocked(now);
    table_.push_back(now);
  }
  for (int c = 0; c < residualNeed; ++c) {
    const int32_t now = fresh[next++];
    holdLocked(now);
    if (residualNew) {
      residual_.push_back(now);
    } else {
      copy.emplace_back(residual_[(size_t)c], now);
      residual_[(size_t)c] = now;
    }
  }
  lk.unlock();
  const std::exception_ptr failure = pool.copyPages(copy);
  // A new residual is held past a rollback (only an empty sequence's is dropped), and so is a
  // successful copy, which stands in for the shared page it copied.
  if (residualNew) keptByWrite_ += residualNeed;
  if (!failure) keptByWrite_ += (int)copy.size();
  if (copy.empty()) return;
  {
    std::lock_guard<std::mutex> relock(pool.mu_);
    for (size_t c = 0; c < copy.size(); ++c) {
      if (!failure) {
        dropLocked(copy[c].first);  // the copy stands in for it; its other holders keep it
      } else {
        // A failed copy must not leave an uncopied page in the table (or residual): the shared
        // page goes back in (the sequence reads what it read before) and the fresh one to the
        // pool. Appended pages lie past the sequence's length, where rollbackWrite() returns them.
        if (c < copies.size()) table_[(size_t)copies[c]] = copy[c].first;
        else residual_[c - copies.size()] = copy[c].first;
        dropLocked(copy[c].second);
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
}

void KvPages::rollbackWrite(int n) {
  // No prepareWrite since the last commit (a batch that failed before this sequence's turn): this
  // call took nothing, and the pages past the length are a committed step's early page, kept.
  if (pagesBeforeWrite_ >= 0) {
    const int keep = std::max(pagesFor(std::max(n, 0), pool_->layout_.pageTokens), pagesBeforeWrite_);
    keepPages((size_t)keep);
    if (keep == 0) keptByWrite_ = 0;  // keepPages(0) let go of everything, the residual too
  }
  pagesBeforeWrite_ = -1;
  std::lock_guard<std::mutex> lk(pool_->mu_);
  // The reservation gets back what the write took from it, less the pages it took that stay held
  // (they are no longer needed to grow: a copied page is this sequence's own now), so that it
  // ends as max(0, R - kept) for R reserved before the write.
  const int back = std::max(0, takenFromReservation_ - keptByWrite_);
  reserved_ += back;
  pool_->reservedTotal_ += back;
  takenFromReservation_ = 0;
  keptByWrite_ = 0;
}

void KvPages::commitWrite() {
  takenFromReservation_ = 0;
  keptByWrite_ = 0;
  pagesBeforeWrite_ = -1;
}

size_t KvPages::bytes() const {
  return (table_.size() - (size_t)dropped_ + residual_.size()) * (size_t)pool_->layout_.pageBytes();
}

}  // namespace lckv
