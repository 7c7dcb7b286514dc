#include "io/serialize.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>

#include "common/errors.h"

namespace pyknn {
namespace {

constexpr char kMagic[8] = {'P', 'Y', 'K', 'N', 'N', 'I', 'D', 'X'};
constexpr char kEndTag[4] = {'E', 'N', 'D', '\0'};
constexpr char kPadTag[4] = {'P', 'A', 'D', '\0'};
constexpr uint64_t kMaxPad = 4096;

std::string tag_str(const char tag[4]) {
  std::string s;
  for (int i = 0; i < 4; ++i) s += (tag[i] >= 32 && tag[i] < 127) ? tag[i] : '?';
  while (!s.empty() && s.back() == '?') s.pop_back();
  return s;
}

std::string os_error(const std::string& what, const std::string& path) {
  return what + " '" + path + "': " + std::strerror(errno);
}

// Keeps errno so Python raises the matching OSError subclass (FileNotFoundError, ...).
[[noreturn]] void throw_os(const std::string& msg) { throw Error(ErrorKind::IO, msg, errno); }

}  // namespace

uint64_t checked_mul(uint64_t a, uint64_t b, const char* what) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r))
    throw_format(std::string("corrupted index file: ") + what + " overflows 64 bits");
  return r;
}

// ---- Writer -------------------------------------------------------------------------------

void Writer::raw(const void* data, uint64_t len) {
  hash_.update(data, len);
  put(data, len);
  pos_ += len;
}

void Writer::align(uint64_t alignment) {
  // The next payload starts after its 16-byte section header; a padding section adds 16 more.
  if ((pos_ + 16) % alignment == 0) return;
  const uint64_t pad = (alignment - (pos_ + 32) % alignment) % alignment;
  section_begin(kPadTag, pad);
  static const char zeros[kMaxPad] = {};
  raw(zeros, pad);
}

void Writer::header(const FileHeader& h) {
  raw(kMagic, 8);
  uint32_t words[4] = {h.version, h.kind, h.metric, h.flags};
  raw(words, sizeof words);
  uint64_t sizes[2] = {h.dim, h.count};
  raw(sizes, sizeof sizes);
}

void Writer::section_begin(const char tag[4], uint64_t len) {
  raw(tag, 4);
  uint32_t zero = 0;
  raw(&zero, 4);
  raw(&len, 8);
}

void Writer::section(const char tag[4], const void* data, uint64_t len) {
  section_begin(tag, len);
  if (len) raw(data, len);
}

void Writer::finish() {
  section_begin(kEndTag, 8);
  uint64_t digest = hash_.digest();
  put(&digest, 8);
}

void BytesWriter::put(const void* data, size_t len) {
  out_.append(static_cast<const char*>(data), len);
}

AtomicFileWriter::AtomicFileWriter(const std::string& path) : path_(path) {
  std::random_device rd;
  // A short name in the same folder (so rename is atomic), valid even when `path`'s own name is
  // near the file-system limit.
  const size_t slash = path.rfind('/');
  dir_ = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  tmp_ = dir_ + "/.pyknn-" + std::to_string(getpid()) + "-" + std::to_string(rd()) + ".tmp";
  f_ = std::fopen(tmp_.c_str(), "wb");
  if (!f_) throw_os(os_error("cannot create", tmp_));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (f_) {
    std::fclose(f_);
    std::remove(tmp_.c_str());
  }
}

void AtomicFileWriter::put(const void* data, size_t len) {
  if (std::fwrite(data, 1, len, f_) != len) throw_os(os_error("cannot write", tmp_));
}

void AtomicFileWriter::commit() {
  if (std::fflush(f_) != 0) throw_os(os_error("cannot write", tmp_));
  if (::fsync(fileno(f_)) != 0) throw_os(os_error("cannot sync", tmp_));
  std::FILE* f = f_;
  f_ = nullptr;
  if (std::fclose(f) != 0) {
    int err = errno;
    std::string msg = os_error("cannot close", tmp_);
    std::remove(tmp_.c_str());
    throw Error(ErrorKind::IO, msg, err);
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    int err = errno;
    std::string msg = os_error("cannot rename temporary file to", path_);
    std::remove(tmp_.c_str());
    throw Error(ErrorKind::IO, msg, err);
  }
  // Make the rename itself durable.
  int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

// ---- Reader -------------------------------------------------------------------------------

void Reader::consumed(const void* data, uint64_t len) {
  hash_.update(data, len);
  pos_ += len;
}

void Reader::skip_padding() {
  char t[16];
  if (remaining() < 16) return;
  peek(t, 16);
  if (std::memcmp(t, kPadTag, 4) != 0) return;
  uint64_t len = section_begin(kPadTag, kMaxPad);
  char buf[kMaxPad];
  raw(buf, len);
}

void Reader::raw(void* dst, uint64_t len) {
  if (len > remaining())
    throw_format("truncated index file: needed " + std::to_string(len) + " more bytes at offset " +
                 std::to_string(pos_) + ", only " + std::to_string(remaining()) + " remain");
  get(dst, len);
  hash_.update(dst, len);
  pos_ += len;
}

FileHeader Reader::header() {
  if (size_ < 8 + 16 + 16)
    throw_format("not a pyknn index file: only " + std::to_string(size_) +
                 " bytes, shorter than the header");
  char magic[8];
  raw(magic, 8);
  if (std::memcmp(magic, kMagic, 8) != 0)
    throw_format("not a pyknn index file (wrong magic bytes)");
  FileHeader h;
  uint32_t words[4];
  raw(words, sizeof words);
  h.version = words[0];
  h.kind = words[1];
  h.metric = words[2];
  h.flags = words[3];
  if (h.version < kMinFormatVersion || h.version > kFormatVersion)
    throw_format("unsupported index file format version " + std::to_string(h.version) +
                 " (this pyknn reads versions " + std::to_string(kMinFormatVersion) + " to " +
                 std::to_string(kFormatVersion) + (h.version > kFormatVersion
                                                       ? "; the file was written by a newer pyknn)"
                                                       : ")"));
  uint64_t sizes[2];
  raw(sizes, sizeof sizes);
  h.dim = sizes[0];
  h.count = sizes[1];
  return h;
}

uint64_t Reader::section_begin(const char tag[4], uint64_t max_len) {
  char t[4];
  uint32_t zero;
  uint64_t len;
  raw(t, 4);
  raw(&zero, 4);
  raw(&len, 8);
  if (std::memcmp(t, tag, 4) != 0)
    throw_format("corrupted index file: expected section '" + tag_str(tag) + "', found '" +
                 tag_str(t) + "' at offset " + std::to_string(pos_ - 16));
  if (len > max_len || len > remaining())
    throw_format("corrupted or truncated index file: section '" + tag_str(tag) + "' claims " +
                 std::to_string(len) + " bytes but " + std::to_string(remaining()) +
                 " remain (at most " + std::to_string(max_len) + " expected)");
  return len;
}

void Reader::section(const char tag[4], void* dst, uint64_t len) {
  uint64_t got = section_begin(tag, len);
  if (got != len)
    throw_format("corrupted index file: section '" + tag_str(tag) + "' has " +
                 std::to_string(got) + " bytes, expected " + std::to_string(len));
  if (len) raw(dst, len);
}

std::string Reader::section_string(const char tag[4], uint64_t max_len) {
  uint64_t len = section_begin(tag, max_len);
  std::string s(len, '\0');
  if (len) raw(&s[0], len);
  return s;
}

void Reader::finish() {
  // The END header is hashed too (it precedes the digest).
  char t[4];
  uint32_t zero;
  uint64_t len;
  raw(t, 4);
  raw(&zero, 4);
  raw(&len, 8);
  const uint64_t expected = hash_.digest();
  if (std::memcmp(t, kEndTag, 4) != 0 || len != 8)
    throw_format("corrupted index file: expected the END section at offset " +
                 std::to_string(pos_ - 16));
  uint64_t stored;
  if (remaining() < 8) throw_format("truncated index file: the checksum is missing");
  get(&stored, 8);
  pos_ += 8;
  if (stored != expected) throw_format("corrupted index file: checksum mismatch");
  if (remaining() != 0)
    throw_format("corrupted index file: " + std::to_string(remaining()) +
                 " unexpected bytes after the end");
}

void BytesReader::get(void* dst, size_t len) { std::memcpy(dst, data_ + pos_, len); }
void BytesReader::peek(void* dst, size_t len) { std::memcpy(dst, data_ + pos_, len); }

FileReader::FileReader(const std::string& path) : path_(path) {
  f_ = std::fopen(path.c_str(), "rb");
  if (!f_) throw_os(os_error("cannot open", path));
  struct stat st;
  int err = ::fstat(fileno(f_), &st) != 0 ? errno : (S_ISDIR(st.st_mode) ? EISDIR : 0);
  if (err) {
    std::fclose(f_);
    f_ = nullptr;
    errno = err;
    throw_os(os_error("cannot read", path));
  }
  size_ = static_cast<uint64_t>(st.st_size);
}

FileReader::~FileReader() {
  if (f_) std::fclose(f_);
}

void FileReader::get(void* dst, size_t len) {
  if (std::fread(dst, 1, len, f_) != len) throw_format("cannot read '" + path_ + "': short read");
}

void FileReader::peek(void* dst, size_t len) {
  get(dst, len);
  if (std::fseek(f_, -static_cast<long>(len), SEEK_CUR) != 0)
    throw_os(os_error("cannot seek in", path_));
}

MappedReader::MappedReader(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_os(os_error("cannot open", path));
  struct stat st;
  const char* what = "cannot read";
  int err = ::fstat(fd, &st) != 0 ? errno : (S_ISDIR(st.st_mode) ? EISDIR : 0);
  void* p = nullptr;
  if (!err && st.st_size > 0) {
    p = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      err = errno;
      what = "cannot map";
    }
  }
  ::close(fd);  // the map stays valid without the descriptor
  if (err) {
    errno = err;
    throw_os(os_error(what, path));
  }
  size_ = static_cast<uint64_t>(st.st_size);
  data_ = static_cast<const char*>(p);
  const size_t bytes = static_cast<size_t>(size_);
  if (p) map_ = std::shared_ptr<const void>(p, [bytes](const void* q) {
    ::munmap(const_cast<void*>(q), bytes);
  });
}

void MappedReader::get(void* dst, size_t len) { std::memcpy(dst, data_ + pos_, len); }
void MappedReader::peek(void* dst, size_t len) { std::memcpy(dst, data_ + pos_, len); }

const void* MappedReader::borrow(uint64_t len, uint64_t alignment) {
  if (pos_ % alignment != 0) return nullptr;
  if (len > remaining())
    throw_format("truncated index file: needed " + std::to_string(len) + " more bytes at offset " +
                 std::to_string(pos_) + ", only " + std::to_string(remaining()) + " remain");
  const char* p = data_ + pos_;
  consumed(p, len);
  return p;
}

}  // namespace pyknn
