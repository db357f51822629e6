#include "tools/daemon_config.h"

#include <arpa/inet.h>

#include <set>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "blockstore/util.h"
// Header-only and without exceptions: errors come back as values.
#define TOML_HEADER_ONLY 1
#define TOML_EXCEPTIONS 0
#include "toml++/toml.h"

namespace tools {

namespace {

std::string Dir(const std::string& file) {
  size_t slash = file.rfind('/');
  return slash == std::string::npos ? "." : file.substr(0, slash);
}

std::string Resolve(const std::string& dir, const std::string& path) {
  if (path.empty() || path[0] == '/') return path;
  return absl::StrCat(dir, "/", path);
}

// 127.0.0.0/8, ::1 and "localhost".
bool IsLoopback(const std::string& host) {
  in_addr v4;
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) {
    return (ntohl(v4.s_addr) >> 24) == 127;
  }
  return host == "::1" || host == "localhost";
}

}  // namespace

bool IsValidSiteName(const std::string& name) {
  if (name.empty() || name.size() > 64 || name[0] == '.' || name[0] == '-') {
    return false;
  }
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' &&
        c != '-') {
      return false;
    }
  }
  return true;
}

absl::StatusOr<DaemonConfig> LoadDaemonConfig(const std::string& path) {
  auto fail = [&](const std::string& key, const std::string& what) {
    return absl::InvalidArgumentError(
        absl::StrCat("config ", path, ": key '", key, "': ", what));
  };
  toml::parse_result parsed = toml::parse_file(path);
  if (!parsed) {
    const toml::parse_error& e = parsed.error();
    return absl::InvalidArgumentError(
        absl::StrCat("config ", path, ": line ", e.source().begin.line, ": ",
                     std::string(e.description())));
  }
  const toml::table& t = parsed.table();
  DaemonConfig c;
  c.file = path;
  const std::string dir = Dir(path);
  static const std::set<std::string> kKeys = {"site",
                                              "listen",
                                              "control",
                                              "metrics",
                                              "nbd",
                                              "nbd_allow",
                                              "checkpoint",
                                              "tls",
                                              "pools",
                                              "peers",
                                              "insecure_plaintext",
                                              "timeout",
                                              "handshake_timeout",
                                              "retry"};
  for (auto&& [key, value] : t) {
    if (!kKeys.contains(std::string(key.str()))) {
      return fail(std::string(key.str()),
                  "unknown key (see docs/tandemd.md for the keys)");
    }
  }
  auto string =
      [&](const char* key,
          bool required) -> absl::StatusOr<std::optional<std::string>> {
    const toml::node* n = t.get(key);
    if (n == nullptr) {
      if (required) return fail(key, "missing");
      return std::optional<std::string>();
    }
    std::optional<std::string> v = n->value<std::string>();
    if (!v || v->empty()) return fail(key, "must be a non-empty string");
    return v;
  };
  absl::StatusOr<std::optional<std::string>> site = string("site", true);
  if (!site.ok()) return site.status();
  c.site = **site;
  if (!IsValidSiteName(c.site)) {
    return fail("site", absl::StrCat("'", c.site,
                                     "' is not a site name (1-64 of A-Z a-z "
                                     "0-9 . _ -)"));
  }
  absl::StatusOr<std::optional<std::string>> listen = string("listen", true);
  if (!listen.ok()) return listen.status();
  absl::StatusOr<transport::HostPort> hp = transport::ParseHostPort(**listen);
  if (!hp.ok()) return fail("listen", std::string(hp.status().message()));
  c.listen = *hp;
  absl::StatusOr<std::optional<std::string>> control = string("control", true);
  if (!control.ok()) return control.status();
  c.control = Resolve(dir, **control);
  absl::StatusOr<std::optional<std::string>> metrics = string("metrics", false);
  if (!metrics.ok()) return metrics.status();
  if (*metrics) {
    absl::StatusOr<transport::HostPort> m = transport::ParseHostPort(**metrics);
    if (!m.ok()) return fail("metrics", std::string(m.status().message()));
    c.metrics = *m;
  }
  absl::StatusOr<std::optional<std::string>> nbd = string("nbd", false);
  if (!nbd.ok()) return nbd.status();
  if (*nbd) {
    absl::StatusOr<transport::HostPort> n = transport::ParseHostPort(**nbd);
    if (!n.ok()) return fail("nbd", std::string(n.status().message()));
    c.nbd = *n;
  }
  if (const toml::node* allow = t.get("nbd_allow"); allow != nullptr) {
    const toml::array* list = allow->as_array();
    if (list == nullptr) {
      return fail("nbd_allow", "must be a list of client addresses");
    }
    for (const toml::node& a : *list) {
      std::optional<std::string> v = a.value<std::string>();
      in6_addr buf;
      if (!v || (inet_pton(AF_INET, v->c_str(), &buf) != 1 &&
                 inet_pton(AF_INET6, v->c_str(), &buf) != 1)) {
        return fail("nbd_allow",
                    "every entry must be an IP address, e.g. \"192.0.2.7\"");
      }
      c.nbd_allow.insert(*v);
    }
  }
  if (c.nbd && c.nbd_allow.empty() && !IsLoopback(c.nbd->host)) {
    return fail("nbd", absl::StrCat("'", c.nbd->ToString(),
                                    "' is not loopback: list the clients "
                                    "allowed in nbd_allow (NBD over TLS is not "
                                    "offered yet)"));
  }
  absl::StatusOr<std::optional<std::string>> checkpoint =
      string("checkpoint", false);
  if (!checkpoint.ok()) return checkpoint.status();
  if (*checkpoint) {
    absl::StatusOr<uint64_t> b =
        blockstore::ParseSize(**checkpoint, "checkpoint");
    if (!b.ok() || *b < (1 << 20)) {
      return fail("checkpoint", "must be a size of at least 1M, e.g. 64M");
    }
    c.checkpoint_bytes = *b;
  }
  for (auto [key, field] :
       {std::pair{"timeout", &c.timeout},
        std::pair{"handshake_timeout", &c.handshake_timeout},
        std::pair{"retry", &c.retry}}) {
    absl::StatusOr<std::optional<std::string>> v = string(key, false);
    if (!v.ok()) return v.status();
    if (!*v) continue;
    absl::Duration d;
    if (!absl::ParseDuration(**v, &d) || d < absl::Milliseconds(100) ||
        d > absl::Hours(24)) {
      return fail(
          key,
          absl::StrCat("'", **v, "' is not a duration such as 15s or 500ms"));
    }
    *field = std::chrono::milliseconds(absl::ToInt64Milliseconds(d));
  }
  const toml::node* plain = t.get("insecure_plaintext");
  const bool plaintext =
      plain != nullptr && plain->value<bool>().value_or(false);
  if (plain != nullptr && !plain->is_boolean()) {
    return fail("insecure_plaintext", "must be true or false");
  }
  const toml::table* tls = t["tls"].as_table();
  if (t.get("tls") != nullptr && tls == nullptr) {
    return fail("tls", "must be a table ([tls])");
  }
  if (plaintext) {
    if (tls != nullptr) {
      return fail("insecure_plaintext",
                  "set either [tls] or insecure_plaintext = true, not both");
    }
    c.security.mode = transport::SecurityConfig::Mode::kPlaintext;
  } else {
    if (tls == nullptr) {
      return fail("tls",
                  "missing: give [tls] cert, key and ca (or psk), or "
                  "insecure_plaintext = true on both daemons");
    }
    std::map<std::string, std::string> files;
    for (auto&& [key, value] : *tls) {
      std::string k(key.str());
      if (k != "cert" && k != "key" && k != "ca" && k != "psk") {
        return fail("tls." + k, "unknown key (cert, key, ca or psk)");
      }
      std::optional<std::string> v = value.value<std::string>();
      if (!v || v->empty()) return fail("tls." + k, "must be a file name");
      files[k] = Resolve(dir, *v);
    }
    if (files.contains("psk")) {
      if (files.size() != 1) {
        return fail("tls.psk", "give psk alone, or cert, key and ca");
      }
      c.security.mode = transport::SecurityConfig::Mode::kPsk;
      c.security.psk_file = files["psk"];
    } else {
      for (const char* k : {"cert", "key", "ca"}) {
        if (!files.contains(k)) {
          return fail(absl::StrCat("tls.", k),
                      "missing (certificates need cert, key and ca)");
        }
      }
      c.security.mode = transport::SecurityConfig::Mode::kCertificates;
      c.security.cert_file = files["cert"];
      c.security.key_file = files["key"];
      c.security.ca_file = files["ca"];
    }
  }
  const toml::table* pools = t["pools"].as_table();
  if (pools == nullptr || pools->empty()) {
    return fail("pools",
                "missing: name at least one pool, e.g. [pools] p = "
                "\"/srv/a.pool\"");
  }
  for (auto&& [key, value] : *pools) {
    std::string name(key.str());
    if (!IsValidSiteName(name)) {
      return fail("pools." + name,
                  "is not a pool name (1-64 of A-Z a-z 0-9 . _ -)");
    }
    std::optional<std::string> v = value.value<std::string>();
    if (!v || v->empty()) {
      return fail("pools." + name, "must be the path of a pool file or device");
    }
    c.pools[name] = Resolve(dir, *v);
  }
  if (const toml::node* peers_node = t.get("peers")) {
    const toml::table* peers = peers_node->as_table();
    if (peers == nullptr) return fail("peers", "must be a table ([peers])");
    for (auto&& [key, value] : *peers) {
      std::string name(key.str());
      if (!IsValidSiteName(name) || name == c.site) {
        return fail("peers." + name, name == c.site
                                         ? "is this daemon's own site"
                                         : "is not a site name");
      }
      std::optional<std::string> v = value.value<std::string>();
      absl::StatusOr<transport::HostPort> a =
          v ? transport::ParseHostPort(*v)
            : absl::StatusOr<transport::HostPort>(
                  absl::InvalidArgumentError("must be \"HOST:PORT\""));
      if (!a.ok())
        return fail("peers." + name, std::string(a.status().message()));
      c.peers[name] = *a;
    }
  }
  return c;
}

}  // namespace tools
