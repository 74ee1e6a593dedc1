"""Running the stack: the local process supervisor behind ``bucketlens up``, S3 notification set-up, configs."""
