#!/usr/bin/env bash
# System packages galsift needs besides Python: a Java 17+ runtime and Maven for the local Kafka
# broker, and Debian's Chromium with its chromedriver for the dashboard's browser test (Selenium
# drives that binary; nothing downloads a browser of its own). Installed with apt when missing (the
# machines here run as root); a no-op otherwise.
set -euo pipefail
need=()
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn  >/dev/null 2>&1 || need+=(maven)
command -v chromium     >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
# Report versions without a pipe: `mvn -v | head -1` under pipefail fails whenever head closes
# the pipe before Maven has finished writing (SIGPIPE, status 141), which made set-up flaky.
java_version=$(java -version 2>&1) || { echo "bootstrap: java is installed but does not run" >&2; exit 1; }
mvn_version=$(mvn -v 2>/dev/null) || { echo "bootstrap: mvn is installed but does not run" >&2; exit 1; }
echo "${java_version%%$'\n'*}"
echo "${mvn_version%%$'\n'*}"
