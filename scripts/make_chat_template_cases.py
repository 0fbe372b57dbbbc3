"""Reference renderings of chat templates by Hugging Face transformers' apply_chat_template.

Run once (needs `pip install transformers jinja2`, no torch) and commit the output:
    python scripts/make_chat_template_cases.py > tests/data/chat/template_cases.json
The Rust tests render the same templates and conversations with minijinja and must produce
exactly these strings.
"""
import json
import sys

import transformers
from transformers import PreTrainedTokenizerFast

TEMPLATES = {
    # REFERENCE.md section 3: BitNet b1.58 2B4T.
    "bitnet-2b4t": (
        "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}",
        "<|begin_of_text|>", "<|eot_id|>"),
    # Meta-Llama-3-8B-Instruct's template (also HF1BitLLM Llama3-8B-1.58).
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        "<|begin_of_text|>", "<|eot_id|>"),
    # Falcon3 style, as described in shared/golden/falcon-tiny/NOTES.md (llama.cpp's FALCON_3):
    # <|role|>\ncontent\n, a finished assistant turn ends with eos before its newline.
    "falcon3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
        "<|endoftext|>", "<|endoftext|>"),
    # ChatML, with Python string methods and a multi-line layout that depends on
    # trim_blocks / lstrip_blocks (as transformers compiles templates).
    "chatml-multiline": (
        "{% for message in messages %}\n"
        "    {% if message['role'] not in ['system', 'user', 'assistant'] %}\n"
        "        {{ raise_exception('bad role') }}\n"
        "    {% endif %}\n"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>\n' }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "{{ '<|im_start|>assistant\n' }}\n"
        "{% endif %}",
        "<s>", "<|im_end|>"),
}

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
    "multi": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hi there  "},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke\nabout cats."},
    ],
    "unicode": [{"role": "user", "content": "Grüße 🌍 — ça va?"}, {"role": "assistant", "content": "Très bien ✓"}],
}


def main():
    tok = PreTrainedTokenizerFast(tokenizer_file="tests/data/falcon-tiny/checkpoint_packed/tokenizer.json")
    cases = []
    for tname, (template, bos, eos) in TEMPLATES.items():
        tok.bos_token = bos
        tok.eos_token = eos
        for cname, messages in CONVERSATIONS.items():
            for gen in (True, False):
                text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)
                cases.append({"template": tname, "conversation": cname, "add_generation_prompt": gen, "expected": text})
    out = {
        "producer": "scripts/make_chat_template_cases.py with transformers " + transformers.__version__,
        "templates": {k: {"source": v[0], "bos_token": v[1], "eos_token": v[2]} for k, v in TEMPLATES.items()},
        "conversations": CONVERSATIONS,
        "cases": cases,
    }
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
