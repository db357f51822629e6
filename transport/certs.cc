#include "transport/certs.h"

#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <cstdio>
#include <memory>

#include "absl/strings/str_cat.h"

namespace transport {

namespace {

struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct CertFree {
  void operator()(X509* c) const { X509_free(c); }
};
using Key = std::unique_ptr<EVP_PKEY, KeyFree>;
using Cert = std::unique_ptr<X509, CertFree>;

absl::Status Failed(const std::string& what) {
  char buf[256] = "no detail";
  if (unsigned long e = ERR_get_error())
    ERR_error_string_n(e, buf, sizeof(buf));
  return absl::InternalError(absl::StrCat(what, ": ", buf));
}

Key NewKey() { return Key(EVP_EC_gen("P-256")); }

// A certificate for `cn` with `key`, signed by `issuer_key` (self-signed
// when `issuer` is null).
Cert NewCert(const std::string& cn, EVP_PKEY* key, X509* issuer,
             EVP_PKEY* issuer_key, long serial) {
  Cert c(X509_new());
  if (!c) return nullptr;
  X509_set_version(c.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c.get()), serial);
  X509_gmtime_adj(X509_getm_notBefore(c.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(c.get()), 30L * 24 * 3600);
  X509_set_pubkey(c.get(), key);
  X509_NAME* name = X509_get_subject_name(c.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(cn.c_str()),
                             -1, -1, 0);
  X509_set_issuer_name(c.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer ? issuer : c.get(), c.get(), nullptr, nullptr, 0);
  const std::string san = absl::StrCat("DNS:", cn);
  for (auto [nid, value] :
       {std::pair{NID_basic_constraints,
                  issuer ? "critical,CA:FALSE" : "critical,CA:TRUE"},
        std::pair{NID_key_usage, issuer ? "critical,digitalSignature"
                                        : "critical,keyCertSign,cRLSign"},
        std::pair{NID_subject_alt_name, san.c_str()}}) {
    if (nid == NID_subject_alt_name && !issuer) continue;
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
    if (ext == nullptr) return nullptr;
    X509_add_ext(c.get(), ext, -1);
    X509_EXTENSION_free(ext);
  }
  if (issuer) {
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, NID_ext_key_usage,
                                              "serverAuth,clientAuth");
    if (ext == nullptr) return nullptr;
    X509_add_ext(c.get(), ext, -1);
    X509_EXTENSION_free(ext);
  }
  if (X509_sign(c.get(), issuer_key, EVP_sha256()) == 0) return nullptr;
  return c;
}

absl::Status WritePem(const std::string& path, X509* cert, EVP_PKEY* key) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr)
    return absl::InternalError(absl::StrCat("cannot write ", path));
  bool ok = cert ? PEM_write_X509(f, cert) == 1
                 : PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr,
                                        nullptr) == 1;
  std::fclose(f);
  if (!cert) chmod(path.c_str(), 0600);
  return ok ? absl::OkStatus() : Failed(absl::StrCat("write ", path));
}

}  // namespace

absl::Status MakeCertificates(const std::string& dir, const std::string& ca,
                              const std::vector<std::string>& sites) {
  Key ca_key = NewKey();
  if (!ca_key) return Failed("CA key");
  Cert ca_cert = NewCert(ca, ca_key.get(), nullptr, ca_key.get(), 1);
  if (!ca_cert) return Failed("CA certificate");
  if (absl::Status s =
          WritePem(absl::StrCat(dir, "/", ca, ".crt"), ca_cert.get(), nullptr);
      !s.ok()) {
    return s;
  }
  long serial = 2;
  for (const std::string& site : sites) {
    Key key = NewKey();
    if (!key) return Failed("site key");
    Cert cert = NewCert(site, key.get(), ca_cert.get(), ca_key.get(), serial++);
    if (!cert) return Failed(absl::StrCat("certificate of ", site));
    if (absl::Status s =
            WritePem(absl::StrCat(dir, "/", site, ".crt"), cert.get(), nullptr);
        !s.ok()) {
      return s;
    }
    if (absl::Status s =
            WritePem(absl::StrCat(dir, "/", site, ".key"), nullptr, key.get());
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace transport
