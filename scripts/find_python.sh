#!/usr/bin/env bash
# Print the path of a Python that OpenFHE's wheels support here, or explain and fail.
# OpenFHE 1.6.1 ships wheels for CPython 3.10 (glibc >= 2.35) and 3.12 (glibc >= 2.38).
set -u
candidates=()
[ -n "${VEIL_PYTHON:-}" ] && candidates+=("$VEIL_PYTHON")
for v in 3.10 3.12; do
  command -v "python$v" >/dev/null 2>&1 && candidates+=("$(command -v "python$v")")
done
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for d in "$root"/versions/3.10.* "$root"/versions/3.12.*; do
  [ -x "$d/bin/python3" ] && candidates+=("$d/bin/python3")
done
for py in "${candidates[@]}"; do
  ok=$("$py" - <<'PY' 2>/dev/null
import platform, sys
need = {(3, 10): (2, 35), (3, 12): (2, 38)}.get(sys.version_info[:2])
lib, ver = platform.libc_ver()
have = tuple(int(x) for x in ver.split(".")[:2]) if lib == "glibc" and ver else (0, 0)
print("yes" if need and have >= need else "no")
PY
)
  if [ "$ok" = "yes" ]; then echo "$py"; exit 0; fi
done
echo "veil needs CPython 3.10 (glibc >= 2.35) or 3.12 (glibc >= 2.38), the versions OpenFHE" \
     "ships wheels for; none was found. Install one (e.g. 'pyenv install 3.10') or set" \
     "VEIL_PYTHON=/path/to/python." >&2
exit 1
