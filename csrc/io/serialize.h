// The on-disk format shared by every index:
//
//   "PYKNNIDX"                      8 bytes of magic
//   u32 format_version, u32 kind, u32 metric, u32 flags (0)
//   u64 dim, u64 count
//   sections: { char tag[4], u32 zero, u64 length, length bytes }...   (order fixed per kind)
//   "END\0", u32 zero, u64 8, u64 checksum                                (XXH64 of all bytes before it)
//
// A "PAD\0" section (zero bytes) may precede a section whose payload the reader may map in place
// (Writer::align): it puts that payload at a 64-byte file offset. Version 2 added it.
//
// Little-endian. Every length is checked against the bytes that remain before anything is allocated,
// so a truncated or hostile file raises a FormatError instead of exhausting memory.
#pragma once
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "common/hash.h"

namespace pyknn {

constexpr uint32_t kFormatVersion = 2;
constexpr uint32_t kMinFormatVersion = 1;

struct FileHeader {
  uint32_t version = kFormatVersion;
  uint32_t kind = 0;
  uint32_t metric = 0;
  uint32_t flags = 0;
  uint64_t dim = 0;
  uint64_t count = 0;
};

class Writer {
 public:
  virtual ~Writer() = default;
  void header(const FileHeader& h);
  void section(const char tag[4], const void* data, uint64_t len);
  // Starts a section whose payload is then written with raw() in pieces totalling len bytes.
  void section_begin(const char tag[4], uint64_t len);
  void raw(const void* data, uint64_t len);
  // Writes a padding section if needed so that the payload of the next section starts at a
  // multiple of `alignment` bytes from the start of the file.
  void align(uint64_t alignment);
  void finish();  // writes the END section with the checksum

 protected:
  virtual void put(const void* data, size_t len) = 0;

 private:
  Hasher64 hash_;
  uint64_t pos_ = 0;
};

class BytesWriter : public Writer {
 public:
  std::string& bytes() { return out_; }

 protected:
  void put(const void* data, size_t len) override;

 private:
  std::string out_;
};

// Writes to a temporary file beside `path`; commit() flushes, fsyncs and renames it into place, so
// readers see either the old file or the complete new one. Without commit() the temp file is removed.
class AtomicFileWriter : public Writer {
 public:
  explicit AtomicFileWriter(const std::string& path);
  ~AtomicFileWriter() override;
  void commit();

 protected:
  void put(const void* data, size_t len) override;

 private:
  std::string path_, dir_, tmp_;
  std::FILE* f_ = nullptr;
};

class Reader {
 public:
  virtual ~Reader() = default;
  // Reads and checks magic and version; kind/metric are checked by the caller.
  FileHeader header();
  // Reads the next section, which must carry `tag`; returns its length after checking it is at most
  // max_len and fits in the remaining input.
  uint64_t section_begin(const char tag[4], uint64_t max_len);
  // Reads a section of exactly `len` bytes into dst.
  void section(const char tag[4], void* dst, uint64_t len);
  std::string section_string(const char tag[4], uint64_t max_len);
  void raw(void* dst, uint64_t len);
  // Skips a padding section if one comes next.
  void skip_padding();
  // Reads the END section and verifies the checksum.
  void finish();
  uint64_t remaining() const { return size_ - pos_; }

  // Memory-mapped input only: the next len bytes in place (checked, hashed, consumed) when they
  // start at a multiple of `alignment`, else nullptr (the caller copies them with raw()).
  virtual const void* borrow(uint64_t len, uint64_t alignment) {
    (void)len;
    (void)alignment;
    return nullptr;
  }
  // What keeps borrowed bytes valid (null unless mapped).
  virtual std::shared_ptr<const void> mapping() const { return nullptr; }

 protected:
  virtual void get(void* dst, size_t len) = 0;
  // Copies the next len bytes without consuming them.
  virtual void peek(void* dst, size_t len) = 0;
  void consumed(const void* data, uint64_t len);  // hashes bytes taken without get()
  uint64_t size_ = 0;
  uint64_t pos_ = 0;

 private:
  Hasher64 hash_;
};

class BytesReader : public Reader {
 public:
  BytesReader(const char* data, size_t len) : data_(data) { size_ = len; }

 protected:
  void get(void* dst, size_t len) override;
  void peek(void* dst, size_t len) override;

 private:
  const char* data_;
};

class FileReader : public Reader {
 public:
  explicit FileReader(const std::string& path);
  ~FileReader() override;

 protected:
  void get(void* dst, size_t len) override;
  void peek(void* dst, size_t len) override;

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

// Reads a file through a read-only shared memory map; sections may be borrowed in place (the
// map lives as long as anything holds mapping()).
class MappedReader : public Reader {
 public:
  explicit MappedReader(const std::string& path);
  const void* borrow(uint64_t len, uint64_t alignment) override;
  std::shared_ptr<const void> mapping() const override { return map_; }

 protected:
  void get(void* dst, size_t len) override;
  void peek(void* dst, size_t len) override;

 private:
  std::shared_ptr<const void> map_;
  const char* data_ = nullptr;
};

// Checked size arithmetic: throws FormatError (reading) on overflow.
uint64_t checked_mul(uint64_t a, uint64_t b, const char* what);

}  // namespace pyknn
