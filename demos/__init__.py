"""The Gradio demo over a `vqa.Predictor` (`demos.app.build_demo`), its example images, and the
embedded default model it serves when no bundle is given (`demos.default_model`).

Gradio is imported inside the functions that need it, so importing this package stays light."""
