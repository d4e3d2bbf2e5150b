"""The HTTP front end: the FastAPI service (app.py), the SageMaker k-NN formats, metrics, the web page."""
