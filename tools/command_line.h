// What the tools share around CLI11.
#ifndef TANDEM_TOOLS_COMMAND_LINE_H_
#define TANDEM_TOOLS_COMMAND_LINE_H_

#include <cstdio>
#include <optional>

#include "CLI/CLI.hpp"

namespace tools {

// Parses argv into `app`, whose callbacks run the command. Returns the exit
// code when parsing ends the run: --help (0, help printed) or a malformed
// command line (2, one line "TOOL: what is wrong (see 'TOOL --help')");
// nullopt when the command ran.
inline std::optional<int> ParseCommandLine(CLI::App& app, int argc, char** argv,
                                           const char* tool) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "%s: %s (see '%s --help')\n", tool, e.what(), tool);
    return 2;
  }
  return std::nullopt;
}

}  // namespace tools

#endif  // TANDEM_TOOLS_COMMAND_LINE_H_
