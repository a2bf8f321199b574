"""Serving over the torch-free runtime (`pip install 'prologue-export[serve]'`): the HTTP app and its
page (`app.py`, `page.py`: `prologue serve`) and the request batcher (`batch.py`). Imports only the
runtime; Starlette and uvicorn are imported only when a server is built."""
