//! Scoring a classifier on labelled images: the one rule for accuracy and speed that every
//! program of the toolkit reports.

use ndarray::ArrayView4;

use crate::{Error, Model, Result};

/// How a classifier did on labelled images.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    /// Images scored.
    pub images: usize,
    /// Images whose highest score is at their label.
    pub correct: usize,
    /// Seconds spent inside [`Model::run`], the first (warm-up) call excluded.
    pub seconds: f64,
}

impl Score {
    /// The share of images classified correctly, in [0, 1] (0 for no images).
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.images.max(1) as f64
    }

    /// Images per second of time inside [`Model::run`].
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }
}

impl Model {
    /// Runs every batch of normalised images and counts those whose highest score (the first
    /// of equal ones) is at the index of their label. The first batch runs once before, untimed,
    /// so that buffers are allocated and caches warm; after that only the time inside
    /// [`Model::run`] counts, not the argmax or the caller's preparation of the batches.
    ///
    /// ```
    /// use model_spec::{LayerSpec, NetworkSpec};
    /// use runtime::{ArtifactBuilder, Model, Storage};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // A linear layer whose second class wins when the first pixel is bright.
    /// let spec = NetworkSpec {
    ///     name: "toy".into(),
    ///     input: [1, 1, 2],
    ///     layers: vec![
    ///         LayerSpec::Flatten,
    ///         LayerSpec::Linear { in_features: 2, out_features: 2 },
    ///     ],
    /// };
    /// let mut builder = ArtifactBuilder::new(spec);
    /// builder.add("1.weight", &[-1.0, 0.0, 1.0, 0.0], &[2, 2], Storage::F32)?;
    /// builder.add("1.bias", &[0.0, 0.0], &[2], Storage::F32)?;
    /// let model = Model::from_bytes(&builder.to_bytes()?)?;
    ///
    /// let images = ndarray::Array4::from_shape_vec((3, 1, 1, 2), vec![1.0, 0.0, -1.0, 0.0, 2.0, 0.0])?;
    /// let labels = [1u8, 0, 0];
    /// let score = model.score([(images.view(), &labels[..])])?;
    /// assert_eq!((score.images, score.correct), (3, 2));
    /// assert!((score.accuracy() - 2.0 / 3.0).abs() < 1e-12);
    ///
    /// // A label count that does not match the batch is an error.
    /// assert!(model.score([(images.view(), &labels[..2])]).is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn score<'a>(
        &self,
        batches: impl IntoIterator<Item = (ArrayView4<'a, f32>, &'a [u8])>,
    ) -> Result<Score> {
        let batches: Vec<_> = batches.into_iter().collect();
        for (images, labels) in &batches {
            if images.shape()[0] != labels.len() {
                return Err(Error::Labels {
                    images: images.shape()[0],
                    labels: labels.len(),
                });
            }
        }
        if let Some((first, _)) = batches.first() {
            self.run(first.view())?;
        }
        let mut score = Score::default();
        for (images, labels) in batches {
            let start = std::time::Instant::now();
            let logits = self.run(images)?;
            score.seconds += start.elapsed().as_secs_f64();
            for (row, &label) in logits.outer_iter().zip(labels) {
                let predicted = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                        if v > best.1 { (i, v) } else { best }
                    })
                    .0;
                score.correct += usize::from(predicted == usize::from(label));
            }
            score.images += labels.len();
        }
        Ok(score)
    }
}
