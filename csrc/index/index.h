// What every index shares: metric, dimension, the user-id <-> row map, input checks, metadata and
// the file header. Algorithms derive from Index; nothing here knows about Python.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <vector>

#include "io/serialize.h"

namespace pyknn {

enum class Metric : uint32_t { IP = 0, L2 = 1, Cosine = 2 };
enum class IndexKind : uint32_t { Flat = 1, IVFFlat = 2, HNSW = 3, IVFPQ = 4, PQ = 5 };

Metric parse_metric(const std::string& name);
const char* metric_name(Metric m);

// Largest accepted squared norm: a quarter of FLT_MAX, so that ||x - y||^2 <= 4 max stays finite.
constexpr float kMaxSquaredNorm = 8.5e37f;

// Throws ValueError naming the first row of x (n x d) that holds NaN or Inf, or whose squared norm
// exceeds kMaxSquaredNorm.
void check_finite(const float* x, size_t n, size_t d, const char* what);
// The same test for data read from a file: FormatError ("corrupted index file: ...") instead.
void check_finite_loaded(const float* x, size_t n, size_t d, const char* what);
// out[i] = x[i] / ||x[i]|| (out may equal x); throws ValueError naming the first zero row.
void normalize_rows(const float* x, size_t n, size_t d, float* out, const char* what);
// out = x * s (out may be x), in double where s is beyond float32's range (subnormal rows).
void scale_row(const float* x, size_t d, double s, float* out);

// Optional restriction of a search: an allow-list of user ids, or a mask over the stored rows.
struct Filter {
  const int64_t* ids = nullptr;
  size_t n_ids = 0;
  const uint8_t* mask = nullptr;
  size_t mask_len = 0;
  bool active() const { return ids != nullptr || mask != nullptr; }
};

// User ids (int64, -1 reserved) and where each one is stored (a row, or a list and offset: the
// index decides). Memory grows with the number of ids, never with their values.
class IdMap {
 public:
  size_t size() const { return size_; }
  // Location of `id`, or -1.
  int64_t find(int64_t id) const;
  // Throws ValueError unless all n ids could be added (not -1, not repeated, not present).
  void check_new(const int64_t* ids, size_t n) const;
  // The ids to add: a copy of `ids`, or the next n default ids (continuing after every id seen).
  std::vector<int64_t> new_ids(const int64_t* ids, size_t n) const;
  // Records checked ids at their locations. Strong guarantee: on failure nothing changes.
  void insert(const int64_t* ids, const int64_t* locations, size_t n);
  // Moves a present id to a new location.
  void relocate(int64_t id, int64_t location);
  void erase(int64_t id);
  // Locations of the given ids; throws KeyError naming the first unknown id unless missing_ok,
  // in which case unknown ids get -1.
  std::vector<int64_t> locations_of(const int64_t* ids, size_t n, bool missing_ok) const;
  size_t memory_usage() const { return slots_.capacity() * sizeof(Slot); }

  // Persistence: the ids themselves are stored by the index (in its own order); these write the
  // default-id counter and rebuild the map from (id, location) pairs read back.
  void write(Writer& w) const;
  void read(Reader& r);
  void rebuild(const int64_t* ids, const int64_t* locations, size_t n);

 private:
  // Open addressing with linear probing: one 16-byte slot per entry at a load of at most 3/4
  // (21-32 bytes per id, against ~48 for std::unordered_map's nodes and buckets), and a lookup
  // touches one or two cache lines. -1 (never a valid id) marks an empty slot; erase shifts
  // later entries back, so there are no tombstones.
  struct Slot {
    int64_t id;
    int64_t loc;
  };
  static constexpr int64_t kEmpty = -1;
  size_t home(int64_t id) const;
  size_t probe(int64_t id) const;  // the slot holding id, or the empty slot ending its run
  // Capacity for n entries at the maximum load.
  static size_t capacity_for(size_t n) { return n + n / 3 + 1; }
  void rehash(size_t capacity);

  std::vector<Slot> slots_;
  size_t size_ = 0;
  int64_t next_default_ = 0;
};

// A 0/1 mask over n stored positions from a filter: a mask is checked for length and copied; an
// allow-list marks the positions of the ids present (others are ignored).
std::vector<uint8_t> filter_mask(const Filter& f, const IdMap& ids, size_t n);

// Reads an id section of `count` ids after checking it fits in the remaining input.
std::vector<int64_t> read_ids(Reader& r, uint64_t count);

class Index {
 public:
  Index(size_t dim, Metric metric);
  virtual ~Index() = default;

  virtual IndexKind kind() const = 0;
  size_t dim() const { return dim_; }
  Metric metric() const { return metric_; }
  size_t size() const;
  // Bytes held by the index (vectors, codes, ids, graph ...), excluding the Python object.
  size_t memory_usage() const;

  // JSON text owned by the Python layer (model id, creation time ...); saved with the index.
  std::string metadata() const;
  void set_metadata(const std::string& json);

  // Writes the whole index in the common format; `save` is atomic.
  void save(const std::string& path) const;
  std::string to_bytes() const;

 protected:
  // The unlocked parts each index implements; callers hold mu_.
  virtual size_t count() const = 0;
  virtual size_t bytes_used() const = 0;
  virtual void write_body(Writer& w) const = 0;
  void write_all(Writer& w) const;
  // Queries ready for search: checks them, and returns q itself or, for cosine, a unit-normalised
  // copy kept in `storage`.
  const float* prepare_queries(const float* q, size_t nq, std::vector<float>& storage) const;
  // Checks vectors to add (finite; non-zero for cosine). Returns their unit-normalised copy for
  // cosine, else an empty vector (store x as given).
  std::vector<float> prepare_vectors(const float* x, size_t n) const;

  size_t dim_;
  Metric metric_;
  std::string metadata_ = "{}";
  // Searches take it shared, mutations exclusive: concurrent searches run in parallel and a
  // writer never exposes a half-applied change.
  mutable std::shared_mutex mu_;
};

// Reads any index written by save/to_bytes; throws FormatError for anything else.
// mmap: map the file read-only and use the large sections in place (HNSW files only).
std::unique_ptr<Index> load_index(const std::string& path, bool mmap = false);
std::unique_ptr<Index> index_from_bytes(const char* data, size_t len);

}  // namespace pyknn
