#include "transport/channel.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "blockstore/mutex.h"
#include "blockstore/util.h"

namespace transport {

using blockstore::MutexLock;

namespace {

constexpr size_t kReadBuffer = 256 << 10;
constexpr int kWriteBuffer = 256 << 10;

std::string OpensslErrors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? "no detail" : out;
}

absl::Status Broken(const char* what) {
  return absl::UnavailableError(
      absl::StrCat("connection ", what, ": ", std::strerror(errno)));
}

class Plain final : public Channel {
 public:
  explicit Plain(Fd fd) : fd_(std::move(fd)) {}

  absl::StatusOr<size_t> ReadSome(std::span<std::byte> out,
                                  Deadline deadline) override {
    for (;;) {
      ssize_t n = read(fd_.get(), out.data(), out.size());
      if (n >= 0) return static_cast<size_t>(n);
      if (errno == EINTR) continue;
      if (errno != EAGAIN) return Broken("read");
      if (absl::Status s = WaitFor(fd_.get(), POLLIN, deadline); !s.ok()) {
        return s;
      }
    }
  }

  absl::Status Write(std::span<const std::span<const std::byte>> pieces,
                     Deadline deadline) override {
    for (std::span<const std::byte> data : pieces) {
      while (!data.empty()) {
        ssize_t n = send(fd_.get(), data.data(), data.size(), MSG_NOSIGNAL);
        if (n > 0) {
          data = data.subspan(n);
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno != EAGAIN) return Broken("write");
        if (absl::Status s = WaitFor(fd_.get(), POLLOUT, deadline); !s.ok()) {
          return s;
        }
      }
    }
    return absl::OkStatus();
  }

  void Shutdown() override { shutdown(fd_.get(), SHUT_RDWR); }
  std::string Describe() const override { return "plaintext"; }
  bool HungUp() const override { return PeerHungUp(fd_.get()); }

 private:
  Fd fd_;
};

// TLS over a non-blocking socket. OpenSSL's SSL object may not be used by
// two threads at once, so every SSL call holds mu_; waiting for the socket
// happens outside it, so a reader and a writer never block each other.
class Tls final : public Channel {
 public:
  Tls(Fd fd, SSL* ssl, std::string how)
      : fd_(std::move(fd)), ssl_(ssl), how_(std::move(how)) {}
  ~Tls() override { SSL_free(ssl_); }

  absl::StatusOr<size_t> ReadSome(std::span<std::byte> out,
                                  Deadline deadline) override {
    for (;;) {
      int err;
      {
        MutexLock lock(mu_);
        size_t n = 0;
        if (SSL_read_ex(ssl_, out.data(), out.size(), &n) == 1) return n;
        err = SSL_get_error(ssl_, 0);
        if (err == SSL_ERROR_ZERO_RETURN) return size_t{0};
        if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
          return absl::UnavailableError(absl::StrCat(
              "TLS read: ", err == SSL_ERROR_SYSCALL ? std::strerror(errno)
                                                     : OpensslErrors()));
        }
      }
      if (absl::Status s =
              WaitFor(fd_.get(), err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT,
                      deadline);
          !s.ok()) {
        return s;
      }
    }
  }

  // Records go into the write buffer (see AttachSocket) and out to the
  // socket as it fills; the rest is flushed at the end.
  absl::Status Write(std::span<const std::span<const std::byte>> pieces,
                     Deadline deadline) override {
    for (std::span<const std::byte> data : pieces) {
      while (!data.empty()) {
        int err;
        {
          MutexLock lock(mu_);
          size_t n = 0;
          if (SSL_write_ex(ssl_, data.data(), data.size(), &n) == 1) {
            data = data.subspan(n);
            continue;
          }
          err = SSL_get_error(ssl_, 0);
          if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
            return WriteError(err);
          }
        }
        if (absl::Status s = WaitFor(
                fd_.get(), err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT,
                deadline);
            !s.ok()) {
          return s;
        }
      }
    }
    for (;;) {
      {
        MutexLock lock(mu_);
        BIO* out = SSL_get_wbio(ssl_);
        if (BIO_flush(out) == 1) return absl::OkStatus();
        if (!BIO_should_retry(out)) return WriteError(SSL_ERROR_SYSCALL);
      }
      if (absl::Status s = WaitFor(fd_.get(), POLLOUT, deadline); !s.ok()) {
        return s;
      }
    }
  }

  void Shutdown() override { shutdown(fd_.get(), SHUT_RDWR); }
  std::string Describe() const override { return how_; }
  bool HungUp() const override { return PeerHungUp(fd_.get()); }

 private:
  static absl::Status WriteError(int err) {
    return absl::UnavailableError(absl::StrCat(
        "TLS write: ",
        err == SSL_ERROR_SYSCALL ? std::strerror(errno) : OpensslErrors()));
  }

  Fd fd_;
  blockstore::Mutex mu_;
  SSL* const ssl_;
  const std::string how_;
};

// `ssl` reads from `fd` directly (read-ahead fills its own buffer) and
// writes through a buffer of kWriteBuffer: a 1 MiB frame goes out in a few
// large writes, not one per 16 KiB record.
bool AttachSocket(SSL* ssl, int fd) {
  BIO* sock = BIO_new_socket(fd, BIO_NOCLOSE);
  BIO* buffer = BIO_new(BIO_f_buffer());
  if (sock == nullptr || buffer == nullptr ||
      BIO_set_write_buffer_size(buffer, kWriteBuffer) != 1) {
    BIO_free(sock);
    BIO_free(buffer);
    return false;
  }
  BIO_push(buffer, sock);
  BIO_up_ref(sock);  // held by both chains; SSL_free frees each
  SSL_set_bio(ssl, sock, buffer);
  return true;
}

absl::StatusOr<std::string> ReadFile(const std::string& path,
                                     const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read the ", what, " file ", path));
  }
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

absl::StatusOr<std::string> LoadPsk(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path, "pre-shared key");
  if (!text.ok()) return text.status();
  absl::StatusOr<std::vector<std::byte>> raw =
      blockstore::Unhex(absl::StripAsciiWhitespace(*text));
  if (!raw.ok() || raw->size() < 32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pre-shared key file ", path,
        " must hold at least 32 bytes as hex; make one with `openssl rand "
        "-hex 32 > ",
        path, "`"));
  }
  return std::string(reinterpret_cast<const char*>(raw->data()), raw->size());
}

// TLS 1.3 external PSK: a session carrying the key, for AES-256-GCM.
constexpr unsigned char kAes256GcmSha384[] = {0x13, 0x02};

SSL_SESSION* PskSession(SSL* ssl, const std::string& key) {
  const SSL_CIPHER* cipher = SSL_CIPHER_find(ssl, kAes256GcmSha384);
  if (cipher == nullptr) return nullptr;
  SSL_SESSION* s = SSL_SESSION_new();
  if (s == nullptr ||
      !SSL_SESSION_set1_master_key(
          s, reinterpret_cast<const unsigned char*>(key.data()), key.size()) ||
      !SSL_SESSION_set_cipher(s, cipher) ||
      !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
    SSL_SESSION_free(s);
    return nullptr;
  }
  return s;
}

// Per-connection state reached from OpenSSL's callbacks.
struct PskState {
  const std::string* key = nullptr;
  std::string identity;  // client: ours; server: what the peer presented
};
int psk_index = -1;
std::once_flag psk_index_once;

PskState* StateOf(SSL* ssl) {
  return static_cast<PskState*>(SSL_get_ex_data(ssl, psk_index));
}

int UsePsk(SSL* ssl, const EVP_MD* md, const unsigned char** id, size_t* idlen,
           SSL_SESSION** sess) {
  PskState* st = StateOf(ssl);
  *sess = nullptr;
  if (st == nullptr) return 0;
  SSL_SESSION* s = PskSession(ssl, *st->key);
  if (s == nullptr) return 0;
  if (md != nullptr &&
      md != SSL_CIPHER_get_handshake_digest(SSL_SESSION_get0_cipher(s))) {
    SSL_SESSION_free(s);  // not for this handshake's hash: offer nothing
    return 1;
  }
  *id = reinterpret_cast<const unsigned char*>(st->identity.data());
  *idlen = st->identity.size();
  *sess = s;
  return 1;
}

int FindPsk(SSL* ssl, const unsigned char* identity, size_t identity_len,
            SSL_SESSION** sess) {
  PskState* st = StateOf(ssl);
  *sess = nullptr;
  if (st == nullptr || identity_len == 0 || identity_len > 200) return 1;
  st->identity.assign(reinterpret_cast<const char*>(identity), identity_len);
  *sess = PskSession(ssl, *st->key);
  return *sess != nullptr ? 1 : 0;
}

// Runs SSL_accept / SSL_connect on the non-blocking socket to `deadline`.
absl::Status Handshake(SSL* ssl, int fd, bool server, Deadline deadline) {
  for (;;) {
    int rc = server ? SSL_accept(ssl) : SSL_connect(ssl);
    if (rc == 1) return absl::OkStatus();
    int err = SSL_get_error(ssl, rc);
    if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
      return absl::PermissionDeniedError(absl::StrCat(
          "TLS handshake failed: ", err == SSL_ERROR_SYSCALL
                                        ? std::string("connection closed")
                                        : OpensslErrors()));
    }
    absl::Status s =
        WaitFor(fd, err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline);
    if (absl::IsDeadlineExceeded(s)) {
      return absl::DeadlineExceededError("TLS handshake timed out");
    }
    if (!s.ok()) return s;
  }
}

std::string CommonName(X509* cert) {
  char cn[256] = "";
  X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn,
                            sizeof(cn));
  return cn;
}

}  // namespace

std::unique_ptr<Channel> PlainChannel(Fd fd) {
  return std::make_unique<Plain>(std::move(fd));
}

absl::StatusOr<std::unique_ptr<Security>> Security::Create(
    const SecurityConfig& config) {
  std::unique_ptr<Security> s(new Security(config));
  // OpenSSL writes to the socket with write(2): a peer that went away must
  // be an error return, not SIGPIPE ending the process.
  signal(SIGPIPE, SIG_IGN);
  if (config.mode == SecurityConfig::Mode::kPlaintext) return s;
  std::call_once(psk_index_once, [] {
    psk_index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  });
  for (bool server : {true, false}) {
    SSL_CTX* ctx =
        SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (ctx == nullptr) {
      return absl::InternalError(
          absl::StrCat("TLS context: ", OpensslErrors()));
    }
    (server ? s->server_ctx_ : s->client_ctx_) = ctx;
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    // Reads take whatever the socket holds, up to kReadBuffer, in one
    // call (without this, two per 16 KiB record: its header, then its body).
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, kReadBuffer);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    if (server) {
      SSL_CTX_set_num_tickets(ctx, 0);
      SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    }
    if (config.mode == SecurityConfig::Mode::kCertificates) {
      if (SSL_CTX_use_certificate_chain_file(ctx, config.cert_file.c_str()) !=
          1) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tls.cert ", config.cert_file, ": cannot load a PEM certificate (",
            OpensslErrors(), ")"));
      }
      if (SSL_CTX_use_PrivateKey_file(ctx, config.key_file.c_str(),
                                      SSL_FILETYPE_PEM) != 1 ||
          SSL_CTX_check_private_key(ctx) != 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("tls.key ", config.key_file,
                         ": cannot load the certificate's PEM private key (",
                         OpensslErrors(), ")"));
      }
      if (SSL_CTX_load_verify_locations(ctx, config.ca_file.c_str(), nullptr) !=
          1) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tls.ca ", config.ca_file, ": cannot load the CA certificate (",
            OpensslErrors(), ")"));
      }
      SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                         nullptr);
    } else {
      if (s->psk_.empty()) {
        absl::StatusOr<std::string> key = LoadPsk(config.psk_file);
        if (!key.ok()) return key.status();
        s->psk_ = *key;
      }
      if (server) {
        SSL_CTX_set_psk_find_session_callback(ctx, FindPsk);
      } else {
        SSL_CTX_set_psk_use_session_callback(ctx, UsePsk);
      }
    }
  }
  return s;
}

Security::~Security() {
  SSL_CTX_free(static_cast<SSL_CTX*>(server_ctx_));
  SSL_CTX_free(static_cast<SSL_CTX*>(client_ctx_));
}

absl::StatusOr<std::unique_ptr<Channel>> Security::Accept(
    Fd fd, Deadline deadline, std::string* identity) {
  identity->clear();
  if (config_.mode == SecurityConfig::Mode::kPlaintext) {
    return PlainChannel(std::move(fd));
  }
  SSL* ssl = SSL_new(static_cast<SSL_CTX*>(server_ctx_));
  if (ssl == nullptr) return absl::InternalError(OpensslErrors());
  PskState state{&psk_, ""};
  SSL_set_ex_data(ssl, psk_index, &state);
  if (!AttachSocket(ssl, fd.get())) {
    SSL_free(ssl);
    return absl::InternalError(OpensslErrors());
  }
  absl::Status hs = Handshake(ssl, fd.get(), true, deadline);
  SSL_set_ex_data(ssl, psk_index, nullptr);
  if (!hs.ok()) {
    SSL_free(ssl);
    return hs;
  }
  std::string how;
  if (config_.mode == SecurityConfig::Mode::kCertificates) {
    X509* cert = SSL_get1_peer_certificate(ssl);
    if (cert == nullptr) {
      SSL_free(ssl);
      return absl::PermissionDeniedError("the peer sent no certificate");
    }
    *identity = CommonName(cert);
    X509_free(cert);
    how = "certificate";
  } else {
    *identity = state.identity;
    how = "pre-shared key";
  }
  std::string desc = absl::StrCat(SSL_get_version(ssl), " ",
                                  SSL_get_cipher_name(ssl), " (", how, ")");
  return std::make_unique<Tls>(std::move(fd), ssl, desc);
}

absl::StatusOr<std::unique_ptr<Channel>> Security::Connect(
    Fd fd, const std::string& peer_site, const std::string& my_site,
    Deadline deadline) {
  if (config_.mode == SecurityConfig::Mode::kPlaintext) {
    return PlainChannel(std::move(fd));
  }
  SSL* ssl = SSL_new(static_cast<SSL_CTX*>(client_ctx_));
  if (ssl == nullptr) return absl::InternalError(OpensslErrors());
  PskState state{&psk_, my_site};
  SSL_set_ex_data(ssl, psk_index, &state);
  if (config_.mode == SecurityConfig::Mode::kCertificates) {
    // The peer's certificate must be issued for the site we dial.
    SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (SSL_set1_host(ssl, peer_site.c_str()) != 1) {
      SSL_free(ssl);
      return absl::InternalError(OpensslErrors());
    }
  }
  if (!AttachSocket(ssl, fd.get())) {
    SSL_free(ssl);
    return absl::InternalError(OpensslErrors());
  }
  absl::Status hs = Handshake(ssl, fd.get(), false, deadline);
  SSL_set_ex_data(ssl, psk_index, nullptr);
  if (!hs.ok()) {
    SSL_free(ssl);
    return absl::Status(hs.code(),
                        absl::StrCat("site ", peer_site, ": ", hs.message()));
  }
  std::string how = config_.mode == SecurityConfig::Mode::kCertificates
                        ? "certificate"
                        : "pre-shared key";
  std::string desc = absl::StrCat(SSL_get_version(ssl), " ",
                                  SSL_get_cipher_name(ssl), " (", how, ")");
  return std::make_unique<Tls>(std::move(fd), ssl, desc);
}

}  // namespace transport
