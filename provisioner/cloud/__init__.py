"""Cloud providers behind one interface (:mod:`provisioner.cloud.base`): Azure agent pools and kwok."""
