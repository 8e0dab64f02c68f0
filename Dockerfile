# Optional prebuilt component image: every step's locked packages (components/step-packages.lock, the same
# table the steps install from), installed once, so a step starts in seconds instead of spending a minute on
# pip. CI builds and pushes it (.github/workflows/ci.yml, cloudbuild.yaml) and publishes templates compiled
# with --image REGION-docker.pkg.dev/PROJECT/REPO/vlp-components:TAG
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/vlp
# The lock is complete (--no-deps, as each step installs it); kfp too, which the launcher installs itself
# when there is no image.
COPY components/step-packages.lock /opt/vlp/step-packages.lock
RUN pip install --no-deps -r /opt/vlp/step-packages.lock kfp==2.17.0

# Only the step code: the CLI, emulators and local stack stay out of the serving path.
COPY components/ /opt/vlp/vlp/components/
ENV PYTHONPATH=/opt/vlp

USER 1000
