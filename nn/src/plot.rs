//! Training charts people read: the loss curves of a stage on a panel of their own (log scale
//! when they span more than a decade and a half), then one panel per held-out metric, each with
//! axes, ticks, labels and a legend, drawn with `plotters` in an embedded font so no system
//! fonts are needed.

use std::sync::Once;

use image::RgbImage;
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::Error;
use crate::images::png_bytes;
use crate::progress::Curves;

const WIDTH: u32 = 800;
const PANEL_HEIGHT: u32 = 260;
const TITLE_HEIGHT: u32 = 40;
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// One panel: its series share the y axis.
struct Panel<'a> {
    title: String,
    series: Vec<(&'a str, &'a [(usize, f64)])>,
}

/// The PNG of `curves`: training series together on top, each held-out metric below.
pub fn training_chart(title: &str, curves: &Curves) -> Result<Vec<u8>, Error> {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        // Only fails on a malformed font file, which the embedded one is not; a chart without
        // text is still drawn.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
    let mut panels = Vec::new();
    if !curves.training.is_empty() {
        panels.push(Panel {
            title: "training loss".into(),
            series: curves
                .training
                .iter()
                .map(|(name, points)| (name.as_str(), points.as_slice()))
                .collect(),
        });
    }
    for (name, points) in &curves.held_out {
        panels.push(Panel {
            title: format!("held out: {name}"),
            series: vec![(name.as_str(), points.as_slice())],
        });
    }
    let last_step = curves
        .training
        .values()
        .chain(curves.held_out.values())
        .flatten()
        .map(|&(step, _)| step)
        .max()
        .unwrap_or(0);
    let height = TITLE_HEIGHT + PANEL_HEIGHT * panels.len().max(1) as u32;
    let mut pixels = vec![255u8; (WIDTH * height * 3) as usize];
    let failed = |e: &dyn std::fmt::Display| Error::Data(format!("drawing '{title}': {e}"));
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        let body = root
            .titled(title, ("sans-serif", 22))
            .map_err(|e| failed(&e))?;
        let areas = body.split_evenly((panels.len().max(1), 1));
        for (area, panel) in areas.iter().zip(&panels) {
            draw_panel(area, panel, last_step).map_err(|e| failed(&e))?;
        }
        root.present().map_err(|e| failed(&e))?;
    }
    let image = RgbImage::from_raw(WIDTH, height, pixels)
        .ok_or_else(|| Error::Data(format!("drawing '{title}': buffer size")))?;
    png_bytes(&image)
}

type AreaError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
    last_step: usize,
) -> Result<(), AreaError> {
    let values = panel.series.iter().flat_map(|(_, points)| points.iter());
    let (low, high) = values.fold((f64::MAX, f64::MIN), |(low, high), &(_, v)| {
        (low.min(v), high.max(v))
    });
    let (low, high) = if low > high { (0.0, 1.0) } else { (low, high) };
    let x = 0f64..(last_step.max(1) as f64);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&panel.title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(65);
    if low > 0.0 && high / low > 30.0 {
        let chart = builder.build_cartesian_2d(x, (low * 0.9..high * 1.1).log_scale())?;
        draw_series(chart, panel)
    } else {
        let pad = ((high - low) * 0.08).max(high.abs() * 0.01).max(1e-6);
        let chart = builder.build_cartesian_2d(x, low - pad..high + pad)?;
        draw_series(chart, panel)
    }
}

fn draw_series<'a, Y>(
    mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    panel: &Panel,
) -> Result<(), AreaError>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style(("sans-serif", 13))
        .draw()?;
    for (index, (name, points)) in panel.series.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let line: Vec<(f64, f64)> = points.iter().map(|&(s, v)| (s as f64, v)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        if line.len() <= 40 {
            chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_a_panel_for_the_losses_and_one_per_held_out_metric() {
        let mut curves = Curves::default();
        for step in 0..50 {
            curves.training("loss", step, 10.0 / (1.0 + step as f64));
            curves.training("mse", step, 0.01 + 1.0 / (1.0 + step as f64));
        }
        for step in [10, 20, 50] {
            curves.held_out("psnr_db", step, 20.0 + step as f64 / 10.0);
            curves.held_out("ssim", step, 0.5 + step as f64 / 200.0);
        }
        curves.held_out("ignored", 5, f64::NAN);
        let png = training_chart("vqgan train", &curves).unwrap();
        let image = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(
            (image.width(), image.height()),
            (WIDTH, TITLE_HEIGHT + 3 * PANEL_HEIGHT)
        );
        // Every panel has ink in it (axes, labels, lines), the title band too.
        for band in 0..4 {
            let (top, height) = if band == 0 {
                (0, TITLE_HEIGHT)
            } else {
                (TITLE_HEIGHT + (band - 1) * PANEL_HEIGHT, PANEL_HEIGHT)
            };
            let ink = (top..top + height)
                .flat_map(|y| (0..WIDTH).map(move |x| (x, y)))
                .filter(|&(x, y)| image.get_pixel(x, y).0 != [255, 255, 255])
                .count();
            assert!(ink > 200, "band {band}: {ink} coloured pixels");
        }
        // Coloured series, not just black axes.
        assert!(image.pixels().any(|p| p.0 == [31, 119, 180]));
    }
}
