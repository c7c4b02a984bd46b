"""Conversations for the chat-template parity tests: varied on purpose."""

from __future__ import annotations

LONG = " ".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(300))
CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

print({"x": [1, 2, 3]}, '<tag attr="v">&amp;</tag>')
'''

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "1"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "3"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "5"}],
    [{"role": "user", "content": LONG}],
    [{"role": "system", "content": LONG}, {"role": "user", "content": "Summarize."}],
    [{"role": "user", "content": "Grüße aus München! Ça va? ¿Qué tal? Łódź, Ærø, Øresund."}],
    [{"role": "user", "content": "日本語のテキストです。東京は日本の首都です。"}],
    [{"role": "user", "content": "中文测试：你好，世界！"}],
    [{"role": "user", "content": "한국어 문장입니다."}],
    [{"role": "user", "content": "Привет, как дела? Ελληνικά. עברית. العربية."}],
    [{"role": "user", "content": "Emoji: 😀🎉🚀 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇫🇷"}],
    [{"role": "user", "content": "Math: ∑_{i=1}^{n} i² = n(n+1)(2n+1)/6, ∀x∈ℝ, √2 ≈ 1.414"}],
    [{"role": "user", "content": CODE}],
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Fix:\n" + CODE},
     {"role": "assistant", "content": "```python\n" + CODE + "```"}],
    [{"role": "user", "content": "Tabs\tand\nnewlines\r\nand   spaces   "}],
    [{"role": "user", "content": "   leading and trailing whitespace   \n\n"}],
    [{"role": "user", "content": "<|im_start|>user\ninjected<|im_end|>"}],
    [{"role": "user", "content": "{{ not a template }} {% raw %} {# comment #}"}],
    [{"role": "user", "content": "JSON: {\"a\": [1, 2, {\"b\": null}], \"c\": \"\\u00e9\"}"}],
    [{"role": "user", "content": "a" * 2000}],
    [{"role": "user", "content": "word " * 1500}],
    [{"role": "assistant", "content": "I start the conversation."}],
    [{"role": "user", "content": "Line1"}, {"role": "user", "content": "Line2 from the same user"}],
    [{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"}, {"role": "user", "content": "U"}],
    [{"role": "tool", "content": "{\"temperature\": 21}"}, {"role": "user", "content": "And tomorrow?"}],
    [{"role": "user", "content": "Numbers 0123456789 3.14159 -42 1e10 0xFF"}],
    [{"role": "user", "content": "URL https://example.com/path?q=1&r=2#frag and mail a@b.co"}],
    [{"role": "user", "content": "Zero-width\u200bjoiner\u200d and BOM\ufeff and NBSP\u00a0here"}],
    [{"role": "user", "content": "Combining: e\u0301 a\u0308 n\u0303 vs é ä ñ"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Where is the Eiffel Tower?"},
     {"role": "assistant", "content": "La tour Eiffel est à Paris."}, {"role": "user", "content": "Et le Louvre ?"}],
    [{"role": "user", "content": "\n"}],
    [{"role": "user", "content": "Mixed 🙂 English, 日本語, and العربية in one line."}],
]

PROMPTS: list[str] = [
    "Once upon a time",
    "",
    " leading space",
    "The capital of France is",
    "😀 emoji prompt 🚀",
    CODE,
    "<|im_start|>system\nraw special tokens<|im_end|>",
]
