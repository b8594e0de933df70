#!/bin/sh
# Point Claude Code at an Agent Prompt Train proxy: writes ANTHROPIC_BASE_URL and the train-id header (and, for
# trains with client keys, the key) into the `env` block of Claude Code's settings file, keeping everything else.
#
#   curl -fsSL http://<proxy>:3000/client-setup/setup.sh | sh -s -- --url http://<proxy>:3000 --train <train>
#
# Options:
#   --url URL        the proxy (default: $PROMPTTRAIN_URL)
#   --train ID       the train to record under (default: $PROMPTTRAIN_TRAIN, else "default")
#   --key KEY        a client key of the train (client-keys trains; default: $PROMPTTRAIN_CLIENT_KEY), sent as
#                    Authorization: Bearer through ANTHROPIC_AUTH_TOKEN
#   --project        write ./.claude/settings.json (this project only) instead of ~/.claude/settings.json
#   --settings FILE  write FILE instead
#   --dry-run        print the resulting settings instead of writing them
# Needs node (which Claude Code itself needs) or python3 to merge JSON.
set -eu

url="${PROMPTTRAIN_URL:-}"
train="${PROMPTTRAIN_TRAIN:-default}"
key="${PROMPTTRAIN_CLIENT_KEY:-}"
settings="${HOME}/.claude/settings.json"
dry_run=0

fail() { printf 'prompttrain setup: %s\n' "$*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --url) [ $# -ge 2 ] || fail "--url needs a value"; url="$2"; shift 2 ;;
    --train) [ $# -ge 2 ] || fail "--train needs a value"; train="$2"; shift 2 ;;
    --key) [ $# -ge 2 ] || fail "--key needs a value"; key="$2"; shift 2 ;;
    --project) settings="$(pwd)/.claude/settings.json"; shift ;;
    --settings) [ $# -ge 2 ] || fail "--settings needs a value"; settings="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" 2>/dev/null || true; exit 0 ;;
    *) fail "unknown option $1 (see --help)" ;;
  esac
done

[ -n "$url" ] || fail "name the proxy: --url http://<proxy>:3000 (or PROMPTTRAIN_URL)"
case "$url" in http://*|https://*) ;; *) fail "--url must start with http:// or https://" ;; esac
url="${url%/}"
# The proxy accepts the same identifiers for trains: letters, digits and . _ : -
if ! printf '%s' "$train" | grep -Eq '^[A-Za-z0-9._:-]+$'; then fail "--train: '$train' is not a valid train id"; fi

export PT_URL="$url" PT_TRAIN="$train" PT_KEY="$key" PT_SETTINGS="$settings" PT_DRY_RUN="$dry_run"

if command -v node >/dev/null 2>&1; then
  node - <<'JS'
const fs = require("fs"), path = require("path");
const file = process.env.PT_SETTINGS;
let settings = {};
if (fs.existsSync(file)) {
  try { settings = JSON.parse(fs.readFileSync(file, "utf8")); }
  catch (error) { console.error(`prompttrain setup: ${file} is not valid JSON; not touching it`); process.exit(1); }
}
if (typeof settings !== "object" || settings === null || Array.isArray(settings)) settings = {};
const env = (typeof settings.env === "object" && settings.env !== null) ? settings.env : {};
env.ANTHROPIC_BASE_URL = process.env.PT_URL;
env.ANTHROPIC_CUSTOM_HEADERS = `train-id: ${process.env.PT_TRAIN}`;
if (process.env.PT_KEY) env.ANTHROPIC_AUTH_TOKEN = process.env.PT_KEY;
settings.env = env;
const text = JSON.stringify(settings, null, 2) + "\n";
if (process.env.PT_DRY_RUN === "1") { process.stdout.write(text); process.exit(0); }
fs.mkdirSync(path.dirname(file), { recursive: true });
fs.writeFileSync(file + ".tmp", text, { mode: 0o600 });
fs.renameSync(file + ".tmp", file);
JS
elif command -v python3 >/dev/null 2>&1; then
  python3 - <<'PY'
import json, os, sys
file = os.environ["PT_SETTINGS"]
settings = {}
if os.path.exists(file):
    try:
        with open(file, encoding="utf-8") as handle:
            settings = json.load(handle)
    except ValueError:
        sys.exit(f"prompttrain setup: {file} is not valid JSON; not touching it")
if not isinstance(settings, dict):
    settings = {}
env = settings.get("env") if isinstance(settings.get("env"), dict) else {}
env["ANTHROPIC_BASE_URL"] = os.environ["PT_URL"]
env["ANTHROPIC_CUSTOM_HEADERS"] = "train-id: " + os.environ["PT_TRAIN"]
if os.environ["PT_KEY"]:
    env["ANTHROPIC_AUTH_TOKEN"] = os.environ["PT_KEY"]
settings["env"] = env
text = json.dumps(settings, indent=2) + "\n"
if os.environ["PT_DRY_RUN"] == "1":
    sys.stdout.write(text)
    sys.exit(0)
os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
descriptor = os.open(file + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
    handle.write(text)
os.replace(file + ".tmp", file)
PY
else
  fail "needs node or python3 to edit $settings; copy the env block of settings.json by hand"
fi

[ "$dry_run" = 1 ] && exit 0
printf 'Claude Code now uses %s (train %s) via %s\n' "$url" "$train" "$settings" >&2
printf 'Check: claude -p "say hi", then look for the request in the dashboard.\n' >&2
