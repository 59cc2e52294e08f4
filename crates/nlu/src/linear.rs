//! Multinomial logistic (softmax) regression with L2 regularisation, trained by L-BFGS.
//!
//! The objective is the one scikit-learn minimises, divided by the number of examples:
//! `mean(cross-entropy) + ||W||² / (2·C·n)`; the bias is not regularised. Weights are stored
//! feature-major (`weights[feature * classes + class]`) so a sparse row touches contiguous
//! memory. The gradient is computed over a fixed number of contiguous row chunks, one thread
//! each, and summed in chunk order: the result depends on the data, the options and the starting
//! point only.

use serde::{Deserialize, Serialize};

use crate::error::{NluError, NluResult};
use crate::features::SparseMatrix;

/// A linear model: one weight per (feature, class) and one bias per class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearModel {
    features: usize,
    classes: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl LinearModel {
    /// Returns a model with all weights zero.
    pub fn zeros(features: usize, classes: usize) -> Self {
        Self {
            features,
            classes,
            weights: vec![0.0; features * classes],
            bias: vec![0.0; classes],
        }
    }

    /// Returns the number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Returns the number of features.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Returns the class scores of every row of `x`.
    pub fn all_logits(&self, x: &SparseMatrix) -> Vec<Vec<f32>> {
        (0..x.rows())
            .map(|i| {
                let (indices, values) = x.row(i);
                let mut logits = vec![0.0; self.classes];
                self.logits(indices, values, &mut logits);
                logits
            })
            .collect()
    }

    /// Writes the class scores of a sparse row into `out` (length = classes).
    pub fn logits(&self, indices: &[u32], values: &[f32], out: &mut [f32]) {
        out.copy_from_slice(&self.bias);
        for (&index, &value) in indices.iter().zip(values) {
            let start = index as usize * self.classes;
            let Some(row) = self.weights.get(start..start + self.classes) else {
                continue;
            };
            for (o, w) in out.iter_mut().zip(row) {
                *o += value * w;
            }
        }
    }

    /// Checks the stored sizes (for models read from storage).
    pub(crate) fn check(&self) -> NluResult<()> {
        if self.weights.len() != self.features * self.classes || self.bias.len() != self.classes {
            return Err(NluError::InvalidModel(
                "weight matrix has the wrong size".to_owned(),
            ));
        }
        if self
            .weights
            .iter()
            .chain(&self.bias)
            .any(|w| !w.is_finite())
        {
            return Err(NluError::InvalidModel("weights must be finite".to_owned()));
        }
        Ok(())
    }

    fn parameters(&self) -> Vec<f32> {
        let mut theta = Vec::with_capacity(self.weights.len() + self.bias.len());
        theta.extend_from_slice(&self.weights);
        theta.extend_from_slice(&self.bias);
        theta
    }

    fn from_parameters(features: usize, classes: usize, mut theta: Vec<f32>) -> Self {
        let bias = theta.split_off(features * classes);
        Self {
            features,
            classes,
            weights: theta,
            bias,
        }
    }
}

/// The loss the weights are trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Loss {
    /// Multinomial cross-entropy: the classes compete for one unit of probability.
    Softmax,
    /// One independent logistic loss per class (one-vs-rest): a text far from every class can
    /// score low on all of them, which helps out-of-scope detection.
    OneVsRest,
}

/// Options of [`fit_softmax`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearOptions {
    /// Inverse regularisation strength (as scikit-learn's `C`).
    pub c: f32,
    /// Stop after this many L-BFGS iterations.
    pub max_iterations: u32,
    /// Stop when the largest gradient component is below this.
    pub tolerance: f32,
    /// Number of correction pairs L-BFGS keeps.
    pub history: usize,
    /// Number of threads (and row chunks) for the gradient.
    pub threads: usize,
    /// The loss.
    pub loss: Loss,
}

impl Default for LinearOptions {
    fn default() -> Self {
        Self {
            c: 20.0,
            max_iterations: 100,
            tolerance: 1e-4,
            history: 7,
            threads: 2,
            loss: Loss::Softmax,
        }
    }
}

impl LinearOptions {
    fn validate(&self) -> NluResult<()> {
        if !(self.c.is_finite() && self.c > 0.0) {
            return Err(NluError::InvalidArgument("C must be positive".to_owned()));
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(NluError::InvalidArgument(
                "tolerance must be >= 0".to_owned(),
            ));
        }
        if self.history == 0 || self.threads == 0 {
            return Err(NluError::InvalidArgument(
                "history and threads must be >= 1".to_owned(),
            ));
        }
        Ok(())
    }
}

/// How training went.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// L-BFGS iterations run.
    pub iterations: u32,
    /// Objective and gradient evaluations (line search included).
    pub evaluations: u32,
    /// Final objective.
    pub loss: f64,
    /// Final largest gradient component.
    pub gradient_max: f64,
    /// True when the gradient tolerance was reached.
    pub converged: bool,
}

/// Trains a softmax regression on the rows of `x` with class ids `y` (each `< classes`),
/// starting from `start` when given (it must have the same shape).
pub fn fit_softmax(
    x: &SparseMatrix,
    y: &[u32],
    features: usize,
    classes: usize,
    options: &LinearOptions,
    start: Option<&LinearModel>,
) -> NluResult<(LinearModel, FitReport)> {
    options.validate()?;
    if x.rows() != y.len() || x.rows() == 0 {
        return Err(NluError::InvalidTrainingSet(
            "no rows, or rows and labels differ".into(),
        ));
    }
    if classes < 2 || y.iter().any(|&c| c as usize >= classes) {
        return Err(NluError::InvalidTrainingSet(
            "class ids out of range".to_owned(),
        ));
    }
    let mut theta = match start {
        Some(model) if model.features == features && model.classes == classes => model.parameters(),
        Some(_) => {
            return Err(NluError::InvalidArgument(
                "starting model has another shape".to_owned(),
            ));
        }
        None => vec![0.0; features * classes + classes],
    };
    let problem = Problem {
        x,
        y,
        classes,
        weights_len: features * classes,
        lambda: 1.0 / (f64::from(options.c) * x.rows() as f64),
        threads: options.threads.min(x.rows()),
        loss: options.loss,
    };
    let report = minimise_lbfgs(&problem, &mut theta, options);
    Ok((
        LinearModel::from_parameters(features, classes, theta),
        report,
    ))
}

struct Problem<'a> {
    x: &'a SparseMatrix,
    y: &'a [u32],
    classes: usize,
    weights_len: usize,
    lambda: f64,
    threads: usize,
    loss: Loss,
}

impl Problem<'_> {
    /// Returns the objective at `theta` and writes its gradient into `grad`; `scratch` holds one
    /// extra gradient buffer per thread beyond the first.
    fn evaluate(&self, theta: &[f32], grad: &mut [f32], scratch: &mut [Vec<f32>]) -> f64 {
        let rows = self.x.rows();
        let chunk = rows.div_ceil(self.threads);
        let scale = 1.0 / rows as f32;
        let mut losses = vec![0.0_f64; self.threads];
        std::thread::scope(|scope| {
            let mut buffers: Vec<&mut [f32]> = Vec::with_capacity(self.threads);
            buffers.push(grad);
            for buffer in scratch.iter_mut() {
                buffers.push(buffer.as_mut_slice());
            }
            let mut handles = Vec::new();
            for ((t, buffer), loss) in buffers.into_iter().enumerate().zip(losses.iter_mut()) {
                let range = (t * chunk).min(rows)..((t + 1) * chunk).min(rows);
                let job = move || {
                    *loss = self.accumulate(theta, range, buffer, scale);
                };
                if t + 1 == self.threads {
                    job();
                } else {
                    handles.push(scope.spawn(job));
                }
            }
            for handle in handles {
                if let Err(panic) = handle.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        });
        for buffer in scratch.iter() {
            for (g, s) in grad.iter_mut().zip(buffer) {
                *g += s;
            }
        }
        let mut loss = losses.iter().sum::<f64>() / rows as f64;
        let lambda = self.lambda as f32;
        let weights = &theta[..self.weights_len];
        let mut squares = 0.0_f64;
        for (g, w) in grad[..self.weights_len].iter_mut().zip(weights) {
            *g += lambda * w;
        }
        for block in weights.chunks(4096) {
            squares += f64::from(block.iter().map(|w| w * w).sum::<f32>());
        }
        loss += 0.5 * self.lambda * squares;
        loss
    }

    /// Adds the data gradient of `rows` (times `scale`) into `grad` and returns their summed loss.
    fn accumulate(
        &self,
        theta: &[f32],
        rows: std::ops::Range<usize>,
        grad: &mut [f32],
        scale: f32,
    ) -> f64 {
        grad.fill(0.0);
        let k = self.classes;
        let (weights, bias) = theta.split_at(self.weights_len);
        let (grad_w, grad_b) = grad.split_at_mut(self.weights_len);
        let mut z = vec![0.0_f32; k];
        let mut loss = 0.0_f64;
        for i in rows {
            let (indices, values) = self.x.row(i);
            z.copy_from_slice(bias);
            for (&j, &v) in indices.iter().zip(values) {
                let row = &weights[j as usize * k..(j as usize + 1) * k];
                for (zc, w) in z.iter_mut().zip(row) {
                    *zc += v * w;
                }
            }
            let label = self.y[i] as usize;
            match self.loss {
                Loss::Softmax => {
                    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0_f32;
                    for zc in &mut z {
                        *zc = (*zc - max).exp();
                        sum += *zc;
                    }
                    let label_p = z[label] / sum;
                    loss += f64::from(-label_p.max(f32::MIN_POSITIVE).ln());
                    // z becomes the scaled residual (p - onehot) / n.
                    let inv = scale / sum;
                    for zc in &mut z {
                        *zc *= inv;
                    }
                    z[label] -= scale;
                }
                Loss::OneVsRest => {
                    for (class, zc) in z.iter_mut().enumerate() {
                        // -ln σ(±z) = softplus(∓z), computed without overflow.
                        let signed = if class == label { -*zc } else { *zc };
                        loss += f64::from(signed.max(0.0) + (-signed.abs()).exp().ln_1p());
                        let p = 1.0 / (1.0 + (-*zc).exp());
                        *zc = scale * (p - if class == label { 1.0 } else { 0.0 });
                    }
                }
            }
            for (gb, r) in grad_b.iter_mut().zip(&z) {
                *gb += r;
            }
            for (&j, &v) in indices.iter().zip(values) {
                let row = &mut grad_w[j as usize * k..(j as usize + 1) * k];
                for (g, r) in row.iter_mut().zip(&z) {
                    *g += v * r;
                }
            }
        }
        loss
    }
}

/// Dot product with f32 lanes summed into f64 per block, so long vectors keep their precision.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut total = 0.0_f64;
    for (ca, cb) in a.chunks(1024).zip(b.chunks(1024)) {
        let mut lanes = [0.0_f32; 8];
        let mut ia = ca.chunks_exact(8);
        let mut ib = cb.chunks_exact(8);
        for (xa, xb) in ia.by_ref().zip(ib.by_ref()) {
            for l in 0..8 {
                lanes[l] += xa[l] * xb[l];
            }
        }
        let tail: f32 = ia
            .remainder()
            .iter()
            .zip(ib.remainder())
            .map(|(x, y)| x * y)
            .sum();
        total += f64::from(lanes.iter().sum::<f32>() + tail);
    }
    total
}

/// `y += a * x`
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

fn max_abs(v: &[f32]) -> f64 {
    f64::from(v.iter().fold(0.0_f32, |m, x| m.max(x.abs())))
}

/// Minimises the problem from `theta` (updated in place) with L-BFGS and a backtracking
/// (Armijo) line search; the objective is convex, so curvature pairs are kept whenever `s·y > 0`.
fn minimise_lbfgs(
    problem: &Problem<'_>,
    theta: &mut Vec<f32>,
    options: &LinearOptions,
) -> FitReport {
    let n = theta.len();
    let mut scratch: Vec<Vec<f32>> = (1..problem.threads).map(|_| vec![0.0; n]).collect();
    let mut grad = vec![0.0_f32; n];
    let mut loss = problem.evaluate(theta, &mut grad, &mut scratch);
    let mut evaluations = 1;
    let mut s_hist: Vec<Vec<f32>> = Vec::new();
    let mut y_hist: Vec<Vec<f32>> = Vec::new();
    let mut rho: Vec<f64> = Vec::new();
    let mut direction = vec![0.0_f32; n];
    let mut candidate = vec![0.0_f32; n];
    let mut candidate_grad = vec![0.0_f32; n];
    let mut alpha = vec![0.0_f64; options.history];
    let tolerance = f64::from(options.tolerance);
    let mut iterations = 0;
    let mut converged = max_abs(&grad) <= tolerance;
    while !converged && iterations < options.max_iterations {
        iterations += 1;
        // Two-loop recursion: direction = -H·grad.
        for (d, g) in direction.iter_mut().zip(&grad) {
            *d = -g;
        }
        let m = s_hist.len();
        for i in (0..m).rev() {
            alpha[i] = rho[i] * dot(&s_hist[i], &direction);
            axpy(-(alpha[i] as f32), &y_hist[i], &mut direction);
        }
        let mut first_step = 1.0_f64;
        if m > 0 {
            let yy = dot(&y_hist[m - 1], &y_hist[m - 1]);
            let gamma = (1.0 / (rho[m - 1] * yy)) as f32;
            direction.iter_mut().for_each(|d| *d *= gamma);
        } else {
            first_step = 1.0 / dot(&grad, &grad).sqrt().max(1.0);
        }
        for i in 0..m {
            let beta = rho[i] * dot(&y_hist[i], &direction);
            axpy((alpha[i] - beta) as f32, &s_hist[i], &mut direction);
        }
        let mut slope = dot(&grad, &direction);
        if slope >= 0.0 {
            // Not a descent direction (rounding): restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            rho.clear();
            for (d, g) in direction.iter_mut().zip(&grad) {
                *d = -g;
            }
            slope = dot(&grad, &direction);
            first_step = 1.0 / (-slope).sqrt().max(1.0);
        }
        // Backtracking line search with quadratic interpolation.
        let mut step = first_step;
        let mut accepted = false;
        let mut candidate_loss = loss;
        for _ in 0..30 {
            for ((c, t), d) in candidate.iter_mut().zip(theta.iter()).zip(&direction) {
                *c = t + step as f32 * d;
            }
            candidate_loss = problem.evaluate(&candidate, &mut candidate_grad, &mut scratch);
            evaluations += 1;
            if candidate_loss.is_finite() && candidate_loss <= loss + 1e-4 * step * slope {
                accepted = true;
                break;
            }
            let quadratic = -slope * step * step / (2.0 * (candidate_loss - loss - slope * step));
            step = if quadratic.is_finite() {
                quadratic.clamp(0.1 * step, 0.5 * step)
            } else {
                0.5 * step
            };
        }
        if !accepted {
            break;
        }
        // New curvature pair, reusing the oldest buffers when the history is full.
        let (mut s, mut y) = if s_hist.len() == options.history {
            rho.remove(0);
            (s_hist.remove(0), y_hist.remove(0))
        } else {
            (vec![0.0; n], vec![0.0; n])
        };
        for i in 0..n {
            s[i] = candidate[i] - theta[i];
            y[i] = candidate_grad[i] - grad[i];
        }
        let sy = dot(&s, &y);
        std::mem::swap(theta, &mut candidate);
        std::mem::swap(&mut grad, &mut candidate_grad);
        let previous_loss = loss;
        loss = candidate_loss;
        if sy > 1e-12 {
            s_hist.push(s);
            y_hist.push(y);
            rho.push(1.0 / sy);
        }
        converged = max_abs(&grad) <= tolerance;
        if (previous_loss - loss).abs() <= 1e-12 * loss.abs().max(1.0) {
            break;
        }
    }
    FitReport {
        iterations,
        evaluations,
        loss,
        gradient_max: max_abs(&grad),
        converged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::SparseVector;

    fn matrix(rows: &[&[(u32, f32)]]) -> SparseMatrix {
        let mut m = SparseMatrix::new();
        for row in rows {
            m.push(&SparseVector {
                indices: row.iter().map(|p| p.0).collect(),
                values: row.iter().map(|p| p.1).collect(),
            });
        }
        m
    }

    #[test]
    fn separates_classes_by_their_features() {
        let x = matrix(&[
            &[(0, 1.0)],
            &[(0, 0.9), (3, 0.1)],
            &[(1, 1.0)],
            &[(2, 1.0)],
            &[(2, 0.8)],
        ]);
        let y = [0, 0, 1, 2, 2];
        let (model, report) = fit_softmax(&x, &y, 4, 3, &LinearOptions::default(), None).unwrap();
        assert!(report.iterations > 0);
        let mut z = [0.0; 3];
        for (i, &label) in y.iter().enumerate() {
            let (indices, values) = x.row(i);
            model.logits(indices, values, &mut z);
            let best = (0..3).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap();
            assert_eq!(best, label as usize);
        }
    }

    #[test]
    fn matches_a_finite_difference_gradient() {
        for loss in [Loss::Softmax, Loss::OneVsRest] {
            gradient_matches_finite_differences(loss);
        }
    }

    fn gradient_matches_finite_differences(loss: Loss) {
        let x = matrix(&[&[(0, 0.6), (1, 0.8)], &[(1, 1.0)], &[(0, 0.3), (2, 0.9)]]);
        let y = [0, 1, 2];
        let problem = Problem {
            x: &x,
            y: &y,
            classes: 3,
            weights_len: 9,
            lambda: 0.1,
            threads: 2,
            loss,
        };
        let theta: Vec<f32> = (0..12).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.1).collect();
        let mut grad = vec![0.0; 12];
        let mut scratch = vec![vec![0.0; 12]];
        problem.evaluate(&theta, &mut grad, &mut scratch);
        for i in 0..12 {
            let mut plus = theta.clone();
            let mut minus = theta.clone();
            plus[i] += 1e-2;
            minus[i] -= 1e-2;
            let mut g = vec![0.0; 12];
            let numeric = (problem.evaluate(&plus, &mut g, &mut scratch)
                - problem.evaluate(&minus, &mut g, &mut scratch))
                / 2e-2;
            assert!(
                (numeric - f64::from(grad[i])).abs() < 1e-3,
                "{i}: {numeric} vs {}",
                grad[i]
            );
        }
    }

    #[test]
    fn gives_the_same_model_for_the_same_inputs() {
        let x = matrix(&[&[(0, 1.0)], &[(1, 1.0)], &[(0, 0.5), (1, 0.5)]]);
        let y = [0, 1, 1];
        let options = LinearOptions {
            threads: 2,
            ..LinearOptions::default()
        };
        let a = fit_softmax(&x, &y, 2, 2, &options, None).unwrap().0;
        let b = fit_softmax(&x, &y, 2, 2, &options, None).unwrap().0;
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_bad_shapes_and_options() {
        let x = matrix(&[&[(0, 1.0)]]);
        assert!(fit_softmax(&x, &[5], 1, 2, &LinearOptions::default(), None).is_err());
        assert!(fit_softmax(&x, &[0, 1], 1, 2, &LinearOptions::default(), None).is_err());
        let bad = LinearOptions {
            c: 0.0,
            ..LinearOptions::default()
        };
        assert!(fit_softmax(&x, &[0], 1, 2, &bad, None).is_err());
        let other = LinearModel::zeros(3, 2);
        assert!(fit_softmax(&x, &[0], 1, 2, &LinearOptions::default(), Some(&other)).is_err());
    }
}
