// tandemd: the daemon of one site (tools/daemon.h). Runs in the
// foreground, one log line per event on stderr; SIGTERM or SIGINT stops it
// (exit 0), leaving interrupted transfers to go on at the next start.
#include <signal.h>

#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tools/command_line.h"
#include "tools/daemon.h"
#include "tools/daemon_config.h"
#ifdef TANDEM_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

int main(int argc, char** argv) {
  CLI::App app{"tandemd: the Tandem daemon of one site"};
  std::string config_file;
  app.add_option("--config", config_file, "the site's TOML config")->required();
  if (std::optional<int> rc =
          tools::ParseCommandLine(app, argc, argv, "tandemd")) {
    return *rc;
  }
  absl::StatusOr<tools::DaemonConfig> config =
      tools::LoadDaemonConfig(config_file);
  if (!config.ok()) {
    std::fprintf(stderr, "tandemd: %s\n",
                 std::string(config.status().message()).c_str());
    return 2;
  }
  // Signals go to this thread's sigwait, not to whichever thread runs.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  const std::string site = config->site;
  auto log = [site](const std::string& line) {
    std::string stamp = absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(),
                                         absl::UTCTimeZone());
    std::fprintf(stderr, "%s tandemd[%s] %s\n", stamp.c_str(), site.c_str(),
                 line.c_str());
  };
  absl::StatusOr<std::unique_ptr<tools::Daemon>> daemon =
      tools::Daemon::Start(*config, log);
  if (!daemon.ok()) {
    std::fprintf(stderr, "tandemd: %s\n",
                 std::string(daemon.status().message()).c_str());
    return 1;
  }
#ifdef TANDEM_HAVE_SYSTEMD
  sd_notify(0, "READY=1");
#endif
  int sig = 0;
  sigwait(&signals, &sig);
  log(absl::StrCat("stopping (", sig == SIGTERM ? "SIGTERM" : "SIGINT", ")"));
#ifdef TANDEM_HAVE_SYSTEMD
  sd_notify(0, "STOPPING=1");
#endif
  (*daemon)->Stop();
  return 0;
}
