"""What recording a refused request's model costs the event loop, per refusal, against the baseline of
parsing the whole body (measured in the same run). A refusal's model is read after the answer went out,
but on the event loop, and refusals are what a flood of over-limit requests gets.

    python bench/refusal_model.py
"""

from __future__ import annotations

import timeit

import orjson

from keyplane.gateway.model_name import model_named

BODIES = {
    "2 KiB chat": {"messages": [{"role": "user", "content": "x" * 2000}], "model": "gpt-4o"},
    "1 MiB, one long message": {"messages": [{"role": "user", "content": "x" * 1_000_000}], "model": "gpt-4o"},
    "1 MiB, 7000 short messages": {"messages": [{"role": "user", "content": "hello " * 20}] * 7000,
                                   "model": "gpt-4o"},
}


def best_of(fn: object, number: int = 50, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number  # type: ignore[arg-type]


def main() -> None:
    print(f"{'body':<28} {'model_named':>12} {'full parse':>12} {'ratio':>7}")
    for name, request in BODIES.items():
        body = orjson.dumps(request)
        assert model_named(body) == "gpt-4o"
        ours = best_of(lambda body=body: model_named(body))
        baseline = best_of(lambda body=body: orjson.loads(body))
        print(f"{name:<28} {ours * 1e6:>10.0f}µs {baseline * 1e6:>10.0f}µs {ours / baseline:>7.2f}")


if __name__ == "__main__":
    main()
