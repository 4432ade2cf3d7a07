"""How BPE is learned: a byte-level byte-pair-encoding trainer, the way GPT-2's tokenizer was made.

GPT-2's regex first cuts the text into pieces (a word with its leading space, a number, punctuation,
whitespace), so that no token spans two words. The vocabulary starts as the 256 single bytes; training
then repeats one step: count each adjacent pair of tokens in all pieces, and merge the most frequent
pair into a new token, until there are vocab_size tokens. The merges, in order, are the tokenizer:
encoding applies them to each piece by rank (earliest learned first); decoding joins the tokens' bytes.

    merges = train_bpe(open("data/shakespeare/input.txt").read(), vocab_size=512)
    ids = encode("ROMEO: Hello", merges)      # ids 0-255 are the bytes, 256 + i the i-th merge
    assert decode(ids, merges) == "ROMEO: Hello"
"""

from collections import Counter

import regex  # re with Unicode's classes, \p{L} (letters) and \p{N} (numbers); installed with tiktoken

# A piece is a contraction, or a run of letters, of digits or of other symbols with at most one space
# before it, or whitespace (where a run of spaces ends before a word, its last space goes to the word).
PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# Ties between equally frequent pairs go to the smallest ids. The `tokenizers` library numbers the bytes
# by GPT-2's printable stand-ins for them (bytes 33-126, 161-172, 174-255, then the others): ranking
# bytes the same way makes our merges equal to the library's.
PRINTABLE = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or b >= 174]
BYTE_RANK = {b: r for r, b in enumerate(PRINTABLE + [b for b in range(256) if b not in PRINTABLE])}


def merge(word: tuple[int, ...], pair: tuple[int, int], new: int) -> tuple[int, ...]:
    """word with each occurrence of pair, from left to right, replaced by the token new."""
    out = []
    for token in word:
        if out and (out[-1], token) == pair:
            out[-1] = new  # and new is not pair[0]: "a a a" becomes "aa a"
        else:
            out.append(token)
    return tuple(out)


def train_bpe(text: str, vocab_size: int) -> list[tuple[bytes, bytes]]:
    """Learn vocab_size - 256 merges (fewer if the pairs run out); each is its two tokens' bytes."""
    # Each distinct piece once, with its count: a word seen 1000 times weighs 1000 in the pair counts.
    words = Counter(tuple(piece.encode("utf-8")) for piece in PATTERN.findall(text))
    pairs = Counter()
    for word, n in words.items():
        for pair in zip(word, word[1:]):
            pairs[pair] += n
    vocab, merges = [bytes([b]) for b in range(256)], []
    rank = lambda t: BYTE_RANK.get(t, t)  # a merged token ranks by its id
    while len(vocab) < vocab_size and pairs:
        pair = max(pairs, key=lambda p: (pairs[p], -rank(p[0]), -rank(p[1])))
        merges.append((vocab[pair[0]], vocab[pair[1]]))
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        # Only the pieces that hold the pair change: move their pair counts from the old to the new piece.
        for word, n in list(words.items()):
            if pair in zip(word, word[1:]):
                new = merge(word, pair, len(vocab) - 1)
                for p in zip(word, word[1:]):
                    pairs[p] -= n
                for p in zip(new, new[1:]):
                    pairs[p] += n
                words[new] = words.pop(word)
        pairs = +pairs  # drop the pairs that no piece holds any more, the merged pair among them
    return merges


def encode(text: str, merges: list[tuple[bytes, bytes]]) -> list[int]:
    """Token ids of text: in each piece, merge the pair of earliest merge first, until none applies."""
    ids = {bytes([b]): b for b in range(256)}
    new = {}  # (id, id) -> id of the merged token; a smaller id is an earlier merge
    for i, (a, b) in enumerate(merges):
        new[ids[a], ids[b]] = ids[a + b] = 256 + i
    out = []
    for piece in PATTERN.findall(text):
        word = tuple(piece.encode("utf-8"))
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: new.get(p, float("inf")))
            if pair not in new:
                break
            word = merge(word, pair, new[pair])
        out.extend(word)
    return out


def decode(ids: list[int], merges: list[tuple[bytes, bytes]]) -> str:
    """The text of token ids; bytes that are not valid UTF-8 (a character cut in two) become U+FFFD."""
    vocab = [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
