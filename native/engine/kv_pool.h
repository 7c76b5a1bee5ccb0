// The paged K/V cache: one pool of fixed-size pages per model, shared by every sequence.
//
// A page holds `pageTokens` consecutive positions of K and V for every KV layer of the plan
// (only the layers that own K/V are cached; a layer that reads another's K/V has no slot), in
// the layout and value type of kv_format.h: per slot the K codes, the V codes and (for the
// scaled types) their scales, so each (slot, K or V) is a contiguous [pageTokens, rowBytes] tile
// that the attention kernels stream through. A sequence owns a page table: entry i is the page
// holding its positions [i * pageTokens, (i + 1) * pageTokens). Pages are reference-counted: fork() shares every
// page, and a shared page is copied before it is written (copy-on-write). The pool's capacity
// in tokens is pages * pageTokens, whatever the number of KV layers: an LCKV model with fewer
// KV layers simply has smaller pages, hence more of them in the same memory.
//
// A channel-key type (int4, kv_format.h) gives each sequence that has written a residual as
// well: residualParts() pages holding the bf16 K/V of the page being written. They are pages of
// the same pool, held, shared by fork, copied before a write and counted like table pages.
#pragma once
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "backend.h"

namespace lckv {

class KvPool;

// One sequence's pages. Holds a reference to each page in `table`; releases them when
// destroyed or truncated. Not thread-safe by itself: one sequence is used by one thread at a
// time (the addon's busy flag); the pool's own state is locked.
class KvPages {
 public:
  explicit KvPages(std::shared_ptr<KvPool> pool);
  ~KvPages();
  KvPages(const KvPages&) = delete;
  KvPages& operator=(const KvPages&) = delete;

  // A new holder of the same pages (each page's count goes up by one).
  std::unique_ptr<KvPages> share() const;
  // Pages covering positions [0, n) stay; the rest are released.
  void keep(int n);
  // Sliding windows: releases the pages wholly below position `pos` (their table entries
  // become -1). Nothing reads them again unless the sequence is rewound below `pos`, which
  // keep() then refuses.
  void releaseBelow(int pos);
  // The first position whose page is still held (0 unless releaseBelow dropped some).
  int firstHeld() const;
  // Releases `count` pages starting at page index `first`; the pages after them move down, so
  // their positions drop by count * pageTokens (a context shift whose K/V stays as computed).
  void erasePages(int first, int count);
  // erasePages() for a shift whose moved keys are rewritten next (RoPE): the moved pages, up to
  // the page of position length - 1, are made private, shared ones copied. The copies take the
  // pages the release frees first, then free pages, then this sequence's reservation. Throws
  // EngineError(LCKV_KV_CACHE_FULL) and changes nothing when they do not suffice; if a copy
  // itself fails (a device error), the table is cut to its first `first` pages and the error
  // rethrown, so the sequence holds only K/V it can still trust.
  void shiftPages(int first, int count, int length);
  // The pages shiftPages(first, count, length) takes beyond those it frees: what a caller
  // reserves before it, so that the shift cannot find the pool empty. A residual still shared
  // is copied by the shift too, but not counted here: a generation's first write copies it
  // first, which its growth counts (pagesToGrow), and counting it twice could make a request
  // wait for pages it never needs.
  int pagesToShift(int first, int count, int length) const;
  // Whether prepareWrite(pos, 1) would change nothing: the page of `pos` is held, by this
  // table alone (and for a channel-key type, the residual too, already holding that page).
  bool writableInPlace(int pos) const;
  // Makes positions [start, start + n) writable: missing pages are taken from the pool, and
  // shared pages in the range are replaced by private copies; so is the residual of a
  // channel-key type (taken at the first write). All or nothing: throws
  // EngineError(LCKV_KV_CACHE_FULL) and changes nothing when the pool cannot supply them.
  void prepareWrite(int start, int n);
  // After a failed forward: keeps positions [0, n) and the pages the table held before the
  // forward's first prepareWrite (a committed decode step may hold the page of the position
  // after its own: decodeBatch takes it early for the step it runs ahead), and gives back the
  // reservation that the writes since the last commitWrite() used up, so the request can still
  // grow as promised.
  void rollbackWrite(int n);
  // After a successful forward: the writes stay, and so does the use of the reservation.
  void commitWrite();
  // Pages this sequence would take to grow from `length` to `total` tokens (new pages plus the
  // copy of a shared partial page).
  int pagesToGrow(int length, int total) const;
  // How a sequence grows, for reserve(): `windowPages` > 0 for a sequence that never holds
  // more than that many pages of its own while it decodes (every layer reads through a sliding
  // window, which releaseBelow() follows); growth up to `decodeFrom` tokens is a prefill (its
  // pages are taken at once), beyond it decoding, a token at a time.
  struct Growth {
    int windowPages = 0;
    int decodeFrom = 0;
  };
  // The pages reserve(length, total, extra, growth) promises.
  int pagesToReserve(int length, int total, int extra, Growth growth) const;
  // Promises the pages needed to grow from `length` to `total` tokens, plus `extra` (a context
  // shift's copies, pagesToShift()), so that other sequences cannot take them; replaces any
  // earlier reservation (nothing to grow and no extra drops it). Throws
  // EngineError(LCKV_KV_CACHE_FULL) when the pool cannot promise them now.
  // With growth.windowPages > 0 the promise is the prefill's pages or what the sequence lacks of
  // its window's, whichever is more (never more than growing to `total` takes), and the pages
  // the window releases go back into the promise, up to the window's, while growth is still
  // ahead: it never needs a page it was not promised.
  void reserve(int length, int total, int extra, Growth growth);
  int reserved() const { return reserved_; }
  // Marks these pages as held for the prefix cache (for cacheStats' "cached" count).
  void setCached(bool cached);

  // The residual (channel-key types, kv_format.h): its parts (empty before the first write),
  // and the page index whose rows it holds (-1: none). The engine moves it to the page it
  // writes next (setResidualPage) after restoring that page's earlier rows when they are not
  // there (residualStale).
  const std::vector<int32_t>& residual() const { return residual_; }
  int residualPage() const { return residualPage_; }
  // Whether another sequence (a fork) holds the residual's parts too (writing them would change it).
  bool residualShared() const;
  void setResidualPage(int page) { residualPage_ = page; }
  // Whether a write at `start` finds the residual without the rows of its page before it: the
  // residual holds another page (the sequence was truncated into a quantized page). The
  // engine then reads those rows back from their codes into the residual first.
  bool residualStale(int start) const;
  // The largest m <= n at which keep(m) keeps the K/V exact: n, unless a channel-key type's
  // rows of position n's page would have to be read back from their codes (residualStale).
  int exactRewind(int n) const;

  const std::vector<int32_t>& table() const { return table_; }
  KvPool& pool() const { return *pool_; }
  size_t bytes() const;

 private:
  friend class KvPool;
  // With the pool locked: one reference of this table to `page` goes (-1: none) / was taken,
  // keeping the prefix-cache count in step.
  void dropLocked(int32_t page);
  void holdLocked(int32_t page);
  // erasePages() with the pool locked and the range checked.
  void eraseLocked(int first, int count);
  // With the pool locked: the moved pages of a shift that are shared, and the released ones
  // that go back to the pool (held by this table alone).
  void shiftCountsLocked(int first, int count, int length, std::vector<int>& shared, int& freed) const;
  std::shared_ptr<KvPool> pool_;
  std::vector<int32_t> table_;
  int reserved_ = 0;
  int reservedTarget_ = 0;  // reserve()'s total
  int windowPages_ = 0;     // reserve()'s growth.windowPages: releaseBelow() refills the promise
  // With the pool locked: held pages no other table holds (a shared page that the window
  // releases goes back to nobody).
  int ownPagesLocked() const;
  bool cached_ = false;
  std::vector<int32_t> residual_;
  int residualPage_ = -1;
  // With the pool locked: whether the residual must be taken (or copied) before a write.
  bool residualMissingLocked() const;
  bool residualSharedLocked() const;
  int dropped_ = 0;  // leading table entries released by releaseBelow (-1)
  int takenFromReservation_ = 0;  // by prepareWrite since the last commitWrite
  int keptByWrite_ = 0;           // pages prepareWrite took that a rollback keeps: copies-on-write, a residual
  int pagesBeforeWrite_ = -1;     // table pages at the first prepareWrite since the last commit or rollback
  // Drops table pages past the first `pages` (and, for none, the residual).
  void keepPages(size_t pages);
};

struct KvPoolStats {
  int pageTokens = 0;
  int pagesTotal = 0;
  int pagesUsed = 0;    // held by at least one sequence
  int pagesFree = 0;
  int pagesCached = 0;  // held only by sequences kept for prefix reuse
  int pagesReserved = 0;  // promised to running requests, not yet taken
  int residualPages = 0;  // pages a sequence's residual takes (channel-key types; 0 otherwise)
  int64_t pageBytes = 0;
  int64_t sharedRefs = 0;  // page references beyond the first (pages shared by forks)
};

class KvPool {
 public:
  // Allocates numPages pages on the backend (throws std::bad_alloc when memory runs out).
  KvPool(Backend& backend, const KvLayout& layout, int numPages);
  const KvLayout& layout() const { return layout_; }
  Tensor& storage() { return storage_; }
  Backend& backend() { return backend_; }
  int totalPages() const { return (int)refs_.size(); }
  KvPoolStats stats() const;
  // Recounts every page's references from the live page tables; returns a description of the
  // first mismatch, or "" when the accounting adds up.
  std::string audit() const;

 private:
  friend class KvPages;
  // Takes `count` free pages (reference 1 each). Caller holds mu_ and has checked available().
  std::vector<int32_t> take(int count);
  // take() into `out`, whose capacity the caller has reserved: allocates nothing.
  void takeInto(int count, std::vector<int32_t>& out);
  void release(int32_t page);  // caller holds mu_
  // Copies page `from` to page `to` for each pair, without the lock: the sources are shared
  // pages, which nobody writes. Returns the first failure (a device error), or null.
  std::exception_ptr copyPages(const std::vector<std::pair<int32_t, int32_t>>& copies);
  int available(int reservedByCaller) const { return (int)free_.size() - (reservedTotal_ - reservedByCaller); }

  Backend& backend_;
  KvLayout layout_;
  Tensor storage_;  // [pages, pageBytes / 4] 32-bit words
  mutable std::mutex mu_;
  std::vector<int> refs_, cachedRefs_;
  std::vector<int32_t> free_;  // a stack: recently freed pages are reused first
  int reservedTotal_ = 0;
  std::set<const KvPages*> holders_;
};

}  // namespace lckv
