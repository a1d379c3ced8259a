"""How often decoding a policy's ids to text and encoding it again changes them, on each real tokenizer.

    .envs/cpu/vllm/bin/python bench/text_round_trip.py [--samples 400] [--budget 512] [--chunk-chars 16] [--seed 0]
    .envs/cpu/vllm/bin/python bench/text_round_trip.py --smoke   # seconds (the unit tests run it)

Stage 2 is built from the policy's token ids, never from its text encoded
again, because the two differ: a policy writes ids one at a time, and they
need not be the canonical encoding of the text they decode to; and the
budget cuts the thinking after B tokens, wherever that falls. On generated
math and code thinking (numbers, LaTeX, indented code, unicode, runs of
spaces and newlines; the same text for a seed), for each real tokenizer
(envs/tokenizers.lock, fetched by ./run.sh setup), the share of samples
whose ids change under decode -> encode, for ids that are:

- canonical: the text's own encoding (the control);
- canonical, cut at B: its first --budget tokens, as the budget cuts a trace;
- one split: the text cut at one random character, each side encoded alone;
- pieces: the text cut at random characters into chunks of about
  --chunk-chars characters, each encoded alone: a valid id sequence a
  policy can write that is not the canonical one.

The cut positions are characters, the same for every tokenizer. About two
minutes of CPU. The shares are printed last, with each tokenizer's mean
tokens a sample.

`--smoke`: 4 samples of 600 characters cut at B = 64: the same code, in
seconds; its shares say little.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from length_control import tokenizer_files  # noqa: E402

WORDS = (
    "so",
    "then",
    "the",
    "value",
    "term",
    "sum",
    "both",
    "sides",
    "we",
    "get",
    "check",
    "case",
    "again",
    "because",
    "each",
    "step",
    "gives",
    "the answer",
    "modulo",
    "integer",
    "remainder",
    "naïve",
    "café",
)
ASIDES = (
    "Wait, that's not right.",
    "Hmm, let me re-check the sign.",
    "Actually —  no.",
    "OK.",
    "Let me double-check   this.",
    "So far so good ✓",
    "🤔 hmm",
    "That gives the same thing…",
)
SYMBOLS = ("≤", "≥", "→", "≈", "×", "π", "∑", "√", "Ω", "∞", "−")


def math_line(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(1, 12)
    return rng.choice(
        [
            f"We have {a} × {b} = {a * b}, so ${a}^{{{c}}}$ has {len(str(a**c))} digits.",
            f"$$\\frac{{{a}}}{{{b}}} + \\sqrt{{{c}}} = {a / b + c**0.5:.4f}$$",
            f"Then x {rng.choice(SYMBOLS)} {a}, and {a} mod {b} = {a % b}.",
            f"So $\\sum_{{k=1}}^{{{c}}} k^2 = {sum(k * k for k in range(1, c + 1))}$ "
            f"and $\\binom{{{c}}}{{2}} = {c * (c - 1) // 2}$.",
            f"Let $f(x) = {a}x^2 - {b}x + {c}$; $f'(x) = {2 * a}x - {b} = 0$ at x = {b / (2 * a):.6f}.",
            f"{rng.choice(WORDS).capitalize()} {' '.join(rng.choices(WORDS, k=rng.randint(3, 9)))}: "
            f"{a}{rng.choice(SYMBOLS)}{b}.",
        ]
    )


def code_block(rng: random.Random) -> str:
    name, n = rng.choice(["count", "solve", "dp", "check", "f"]), rng.randint(2, 500)
    body = rng.choice(
        [
            f"def {name}(n):\n    total = 0\n    for i in range(1, n + 1):\n        if i % {rng.randint(2, 9)} == 0:\n"
            f"            total += i  # multiples\n    return total\n\nprint({name}({n}))",
            f"def {name}(xs):\n    memo = {{}}\n\n    def go(i, acc):\n        if i == len(xs):\n"
            f"            return acc\n        key = (i, acc)\n        if key not in memo:\n"
            f"            memo[key] = max(go(i + 1, acc), go(i + 1, acc + xs[i]))\n        return memo[key]\n"
            f"    return go(0, 0)",
            f"for (int i = 0; i < {n}; ++i) {{\n\tif (a[i] > best) {{\n\t\tbest = a[i];\n\t}}\n}}\n"
            f'printf("%d\\n", best);',
            f's = "résumé — {n} ✓"\nassert len(s) == {len(f"résumé — {n} ✓")}, s  \nprint(s.upper())',
        ]
    )
    return f"```{'python' if body.startswith(('def', 's =')) else 'c'}\n{body}\n```"


def thinking_text(rng: random.Random, chars: int) -> str:
    """Reasoning as a policy writes it: math lines, asides, code blocks, lists, irregular blank lines."""
    parts: list[str] = []
    while sum(map(len, parts)) < chars:
        kind = rng.random()
        if kind < 0.5:
            part = " ".join(math_line(rng) for _ in range(rng.randint(1, 3)))
        elif kind < 0.65:
            part = rng.choice(ASIDES)
        elif kind < 0.85:
            part = code_block(rng)
        else:
            part = "\n".join(f"{i}. {math_line(rng)}" for i in range(1, rng.randint(2, 4)))
        parts.append(part + rng.choice(["", " ", "  "]))
        parts.append(rng.choice(["\n", "\n\n", "\n\n", "\n\n\n", " "]))
    return "".join(parts)


def changed_share(tok, samples: list[list[int]]) -> float:
    """The share of id sequences that decode -> encode does not give back."""
    again = tok(tok.batch_decode(samples), add_special_tokens=False)["input_ids"]
    return sum(ids != back for ids, back in zip(samples, again)) / len(samples)


def in_pieces(tok, text: str, cuts: list[int]) -> list[int]:
    chunks = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)])]
    return [i for ids in tok(chunks, add_special_tokens=False)["input_ids"] for i in ids]


def damage(
    samples: int = 400, budget: int = 512, chunk_chars: int = 16, chars: int = 4000, seed: int = 0
) -> list[tuple[str, float, list[float]]]:
    """Per real tokenizer: (family, mean tokens a sample, the four shares whose ids decode -> encode changes)."""
    rng = random.Random(seed)
    texts = [thinking_text(rng, chars) for _ in range(samples)]
    one_split = [[rng.randrange(1, len(text))] for text in texts]
    pieces = [sorted(rng.sample(range(1, len(text)), len(text) // chunk_chars)) for text in texts]
    rows = []
    for family in tokenizer_files.pins():
        tok = tokenizer_files.load_tokenizer(family)
        canonical = tok(texts, add_special_tokens=False)["input_ids"]
        if min(map(len, canonical)) <= budget:
            raise SystemExit(
                f"a sample is {min(map(len, canonical))} {family} tokens, not over B = {budget}: raise --chars"
            )
        shares = [
            changed_share(tok, ids)
            for ids in (
                canonical,
                [ids[:budget] for ids in canonical],
                [in_pieces(tok, text, cuts) for text, cuts in zip(texts, one_split)],
                [in_pieces(tok, text, cuts) for text, cuts in zip(texts, pieces)],
            )
        ]
        rows.append((family, sum(map(len, canonical)) / len(texts), shares))
        print(f"{family}: done", file=sys.stderr)
    return rows


def print_table(
    rows: list[tuple[str, float, list[float]]], *, samples: int, chars: int, seed: int, budget: int, chunk_chars: int
) -> None:
    print(
        f"{samples} samples of >= {chars} characters of math and code thinking (seed {seed}); "
        f"share whose ids decode -> encode changes:"
    )
    print(
        f"{'tokenizer':<12} {'tokens':>7} {'canonical':>10} {f'cut at B={budget}':>13} {'one split':>10} "
        f"{f'pieces of ~{chunk_chars} chars':>20}"
    )
    for family, tokens, shares in rows:
        print(
            f"{family:<12} {tokens:>7.0f} "
            + " ".join(f"{100 * share:>{width}.1f}%" for share, width in zip(shares, (9, 12, 9, 19)))
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--budget", type=int, default=512, help="B: thinking tokens a cut keeps")
    parser.add_argument("--chunk-chars", type=int, default=16, help="mean characters of a piece")
    parser.add_argument("--chars", type=int, default=4000, help="characters of a sample (at least)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="4 samples of 600 characters, B = 64: seconds")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.chars, args.budget = 4, 600, 64
    settings = dict(
        samples=args.samples, budget=args.budget, chunk_chars=args.chunk_chars, chars=args.chars, seed=args.seed
    )
    print_table(damage(**settings), **settings)


if __name__ == "__main__":
    main()
