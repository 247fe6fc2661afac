"""Input pipelines: `create_dataset` (`pipeline`) over every source (`arrays`,
`folder`, `tfds_source`, the scikit-learn digits), batched from memory
(`memory`) or tf.data."""
