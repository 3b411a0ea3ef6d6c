// tilt's entry point; the tool itself is run_command_line (cli.cpp).
#include "registry.h"

int main(int argc, char** argv) { return tilt::cli::run_command_line(argc, argv); }
