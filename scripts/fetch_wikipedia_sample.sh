#!/usr/bin/env bash
# The English Wikipedia sample of rome.corpus 'wikipedia_sample' (ROME's key statistic): a MediaWiki
# XML dump of 206 pages (97 articles with prose) shipped as test data in the gensim package (pinned
# below; the text is Wikipedia's, CC BY-SA). Fetched once from the package registry into
# resources/corpora/ and checked against its sha256; nothing is installed. Idempotent.
# Usage: scripts/fetch_wikipedia_sample.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=resources/corpora/enwiki-sample.xml.bz2
SHA=a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d
MEMBER=gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2
if [ -f "$OUT" ] && echo "$SHA  $OUT" | sha256sum -c --quiet >/dev/null 2>&1; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11 \
  --implementation cp gensim==4.4.0 -d "$tmp"
mkdir -p "$(dirname "$OUT")"
"$PY" - "$tmp" "$MEMBER" "$OUT.tmp" <<'PYEOF'
import glob, shutil, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/gensim-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
if ! echo "$SHA  $OUT.tmp" | sha256sum -c --quiet >/dev/null 2>&1; then
  rm -f "$OUT.tmp"
  echo "fetch_wikipedia_sample: the file in gensim 4.4.0 does not have the expected sha256 $SHA" >&2
  exit 1
fi
mv "$OUT.tmp" "$OUT"
echo "fetched $OUT (English Wikipedia sample, CC BY-SA)" >&2
