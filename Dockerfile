# Optional prebuilt component image: the same pins as the embedded default, installed once, so a step
# starts in seconds instead of spending a minute on pip. Build and push, then compile or run with
# --image REGION-docker.pkg.dev/PROJECT/REPO/vlp-components:TAG
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/vlp
# Mirrors components/packaging.py RUNTIME_PACKAGES (+ kfp, which the embedded default installs itself).
RUN pip install \
      kfp==2.17.0 \
      google-cloud-aiplatform==1.165.1 \
      google-cloud-pipeline-components==2.22.0 \
      google-cloud-storage==3.17.1 \
      google-cloud-secret-manager==2.32.0 \
      google-cloud-quotas==0.6.3 \
      google-cloud-logging==3.17.0 \
      google-crc32c==1.9.0 \
      huggingface_hub==2.4.0 \
      transformers==5.23.0 \
      pydantic==2.14.3 \
      PyYAML==6.0.3 \
      requests==2.33.0

# Only the step code: the CLI, emulators and local stack stay out of the serving path.
COPY components/ /opt/vlp/components/
ENV PYTHONPATH=/opt/vlp

USER 1000
