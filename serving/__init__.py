"""Serving a trained model: the terminal REPL (`chat`), the HTTP API (`api`) and its web page (`web/`),
over the engines that `backends` names (mlx, onnx, torch-int8, torch).

    python chat.py --model runs/base/final        # or: python -m serving.chat, t5r-chat
    python api.py --model runs/base/final         # or: python -m serving.api, t5r-api
"""
