"""The browser playground (python -m demos.playground): plain functions over minigpt and techniques in
`core.py` (testable without gradio), the gradio page in `app.py` (gradio is the `app` extra)."""
