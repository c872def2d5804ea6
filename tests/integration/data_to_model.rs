//! The bundled dataset flows through `mnist-data` into a `models` network that learns.

use integration_tests::bundled_mnist;
use mnist_data::{Batcher, Dataset, Normalization, Split};
use models::{Network, NetworkSpec};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// One epoch on 5% of MNIST (3000 images) is already far above chance (10%).
const MIN_ACCURACY_AFTER_SHORT_TRAINING: f64 = 0.8;

fn tensors(split: &Split) -> (Tensor, Tensor) {
    let images = split.normalized(Normalization::default());
    let shape: Vec<i64> = images.shape().iter().map(|&d| d as i64).collect();
    let xs = Tensor::from_slice(images.as_slice().unwrap()).view(shape.as_slice());
    let ys = Tensor::from_slice(split.labels.as_slice().unwrap()).to_kind(Kind::Int64);
    (xs, ys)
}

#[test]
fn teacher_learns_from_a_small_stratified_subset() -> anyhow::Result<()> {
    let data = Dataset::load(&bundled_mnist())?;
    let train = data.train.stratified_subset(0.05, 1)?;
    assert_eq!(train.class_counts().iter().sum::<usize>(), train.len());
    let test = data.test.stratified_subset(0.1, 1)?;
    let (train_x, train_y) = tensors(&train);
    let (test_x, test_y) = tensors(&test);

    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn())?;
    let mut opt = nn::Adam::default().build(&vs, 2e-3)?;
    for batch in Batcher::new(train.len(), 64, 1)?.epoch(0) {
        let index = Tensor::from_slice(&batch.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let loss = net
            .forward_t(&train_x.index_select(0, &index), true)
            .cross_entropy_for_logits(&train_y.index_select(0, &index));
        opt.backward_step(&loss);
    }
    let accuracy = tch::no_grad(|| {
        net.forward_t(&test_x, false)
            .accuracy_for_logits(&test_y)
            .double_value(&[])
    });
    assert!(
        accuracy > MIN_ACCURACY_AFTER_SHORT_TRAINING,
        "accuracy {accuracy}"
    );
    Ok(())
}
