FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY featurestream ./featurestream
RUN pip install --no-cache-dir ".[serving]"
COPY definitions ./definitions
CMD ["featurestream", "--help"]
