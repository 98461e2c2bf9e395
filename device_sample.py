"""Sample from a trained model: one completion, an interactive prompt, or an OpenAI-compatible HTTP server.

python device_sample.py --config configs/demo.json --prompt "def "
python device_sample.py --config configs/demo.json                      # interactive
python device_sample.py --config configs/demo.json --serve --port 8000  # OpenAI completions and chat API
"""

import argparse
import os
import sys

from mesh_transformer.errors import UserError, run_cli

API_KEY_ENV = "MESH_TRANSFORMER_API_KEY"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the model's JSON config")
    p.add_argument(
        "--ckpt", help="checkpoint dir (full or slim) or model_dir (default: the config's model_dir)"
    )
    p.add_argument("--model-dir", help="model_dir to take the newest checkpoint and the tokenizer from")
    p.add_argument("--tokenizer", help="tokenizer.json or dataset dir (default: the run's dataset/)")
    p.add_argument("--prompt", help="complete this text and exit (default: an interactive prompt)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per completion")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    p.add_argument("--stop", action="append", default=[], help="end the text before this string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", action="store_true", help="run the HTTP server instead")
    p.add_argument("--host", default="127.0.0.1", help="address the server binds (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"bearer key (default: ${API_KEY_ENV})"
    )
    p.add_argument("--max-batch", type=int, default=16, help="rows the server's engine decodes together")
    p.add_argument(
        "--chat-template",
        help="Jinja chat template file for /v1/chat/completions (default: chat_template of the "
        "tokenizer_config.json beside the tokenizer)",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import jax

    from mesh_transformer.config import load_config
    from mesh_transformer.engine import load_generator
    from mesh_transformer.run import model_dir_for
    from mesh_transformer.sampling import Row, SamplingParams

    config = load_config(args.config)
    if args.max_batch < 1 or not 0 < args.port < 65536:
        raise UserError(
            f"--max-batch must be >= 1 and --port in 1..65535, got {args.max_batch} and {args.port}"
        )
    if args.chat_template is not None and not os.path.isfile(args.chat_template):
        raise UserError(f"--chat-template {args.chat_template}: no such file")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", config.mp)  # a CPU-only host emulates the model's devices
    ckpt = args.ckpt or model_dir_for(config, args.model_dir)
    generator = load_generator(config, ckpt, tokenizer_path=args.tokenizer, max_batch=args.max_batch)

    if args.serve:
        from mesh_transformer.serving import ServerOptions, build_app, serve
        from mesh_transformer.serving.chat import load_chat_template

        template = load_chat_template(generator.tokenizer, args.chat_template, generator.tokenizer_path)
        print(f"{config.name}: compiling the engine's programs before serving", file=sys.stderr)
        options = ServerOptions(
            model_name=config.name,
            max_batch=args.max_batch,
            api_key=args.api_key or None,
            chat_template=template,
            warm_up=True,
        )
        serve(build_app(generator, options), host=args.host, port=args.port)
        return

    settings = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=tuple(args.stop),
        seed=args.seed,
    )

    def complete(prompt: str) -> None:
        ids = generator.tokenizer.encode(prompt).ids
        print(prompt, end="", flush=True)
        generator.generate([Row(ids, settings)], on_text=lambda _, delta: print(delta, end="", flush=True))
        print()

    if args.prompt is not None:
        complete(args.prompt)
        return
    print(f"{config.name}: type a prompt, Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        try:
            if prompt:
                complete(prompt)
        except UserError as e:  # a prompt too long for the context should not end the session
            print(f"error: {e}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
