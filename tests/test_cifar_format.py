"""The CIFAR-10 python format: what make-data writes is what the readers (VDVAE's, ours) get back."""
import pickle

import numpy as np
import pytest

from vaepatch import cifar_format


def test_read_returns_exactly_the_written_crops_in_order(tmp_path):
    cifar_format.make(tmp_path, n_train=12, n_test=3, seed=4, for_target="nvae")
    crops = cifar_format.crops(15, seed=4)
    train, labels = cifar_format.read(tmp_path, train=True)
    test, _ = cifar_format.read(tmp_path, train=False)
    assert train.dtype == np.uint8 and train.shape == (12, 32, 32, 3) and labels == [0] * 12
    assert np.array_equal(train, crops[:12]) and np.array_equal(test, crops[12:])


def test_read_takes_the_real_files_str_keys(tmp_path):
    """The real CIFAR-10 batches were pickled by Python 2: str keys after latin1 decoding."""
    folder = tmp_path / cifar_format.FOLDER
    folder.mkdir()
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    for name in ["test_batch"] + [f"data_batch_{b}" for b in range(1, 6)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": image.transpose(2, 0, 1).reshape(1, -1), "labels": [7]}, f, protocol=2)
    test, labels = cifar_format.read(tmp_path, train=False)
    assert np.array_equal(test[0], image) and labels == [7]
    assert cifar_format.read(tmp_path, train=True)[0].shape == (5, 32, 32, 3)


def test_missing_batches_name_the_source_and_make_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz.*vaepatch make-data"):
        cifar_format.read(tmp_path)


def test_vdvae_needs_more_than_its_holdout_nvae_does_not(tmp_path):
    with pytest.raises(ValueError, match="holds out 5000"):
        cifar_format.make(tmp_path / "v", n_train=100, n_test=1)
    assert cifar_format.make(tmp_path / "n", n_train=5, n_test=1, for_target="nvae").exists()
    with pytest.raises(ValueError, match="at least 5"):
        cifar_format.make(tmp_path / "n2", n_train=4, n_test=1, for_target="nvae")
