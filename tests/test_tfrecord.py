from pneumo_dist import tfrecord


def test_example_encoding_matches_tensorflow():
    import tensorflow as tf

    features = {
        "b": b"\x00\xffbytes",
        "empty": b"",
        "i": 300,
        "neg": -5,
        "big": 2**62,
        "zero": 0,
        "floats": (0.5, -2.25, 1024.0, 3.0),
        "no-floats": (),
    }

    def feature(value) -> tf.train.Feature:
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        if isinstance(value, tuple):
            return tf.train.Feature(float_list=tf.train.FloatList(value=value))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    ours = tf.train.Example.FromString(tfrecord.encode_example(features))
    expected = tf.train.Example(
        features=tf.train.Features(feature={k: feature(v) for k, v in features.items()})
    )
    assert ours == expected
    parsed = tf.io.parse_single_example(
        tfrecord.encode_example(features), {"floats": tf.io.VarLenFeature(tf.float32)}
    )
    assert parsed["floats"].values.numpy().tolist() == [0.5, -2.25, 1024.0, 3.0]


def test_framed_records_read_back_with_tf_data(tmp_path):
    import tensorflow as tf

    records = [b"", b"one", bytes(range(256)) * 40]
    path = tmp_path / "x.tfrecord"
    path.write_bytes(b"".join(tfrecord.frame(record) for record in records))
    # tf.data checks both CRCs of every record: a wrong length or checksum is a DataLossError.
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records
