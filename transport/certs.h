// Certificates for a set of sites: a CA and, per site, a key and a
// certificate the CA signed, whose CN (and DNS name) is the site name, as
// the peer handshake checks. For the demo and the tests; production sites
// bring their own PKI.
#ifndef TANDEM_TRANSPORT_CERTS_H_
#define TANDEM_TRANSPORT_CERTS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace transport {

// Writes DIR/<ca>.crt and, per site, DIR/<site>.crt and DIR/<site>.key
// (PEM; keys 0600). EC P-256 keys, valid for 30 days.
absl::Status MakeCertificates(const std::string& dir, const std::string& ca,
                              const std::vector<std::string>& sites);

}  // namespace transport

#endif  // TANDEM_TRANSPORT_CERTS_H_
