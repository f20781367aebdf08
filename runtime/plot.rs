//! Charts as PNG (the TVD histogram, the demo's MAL bars), drawn with plotters' bitmap
//! backend only (no system font libraries): plotters' text needs a font engine, so labels
//! are drawn with a built-in 3×5 pixel font (digits, capitals, punctuation) as filled
//! rectangles. The same labels and numbers are in the JSON reports beside the charts.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// 3×5 glyphs, rows top to bottom, '#' = ink.
fn glyph(c: char) -> Option<[&'static str; 5]> {
    Some(match c {
        '0' => ["###", "#.#", "#.#", "#.#", "###"],
        '1' => [".#.", "##.", ".#.", ".#.", "###"],
        '2' => ["###", "..#", "###", "#..", "###"],
        '3' => ["###", "..#", ".##", "..#", "###"],
        '4' => ["#.#", "#.#", "###", "..#", "..#"],
        '5' => ["###", "#..", "###", "..#", "###"],
        '6' => ["###", "#..", "###", "#.#", "###"],
        '7' => ["###", "..#", ".#.", ".#.", ".#."],
        '8' => ["###", "#.#", "###", "#.#", "###"],
        '9' => ["###", "#.#", "###", "..#", "###"],
        '.' => ["...", "...", "...", "...", ".#."],
        '-' => ["...", "...", "###", "...", "..."],
        '=' => ["...", "###", "...", "###", "..."],
        ':' => ["...", ".#.", "...", ".#.", "..."],
        ' ' => ["...", "...", "...", "...", "..."],
        'A' => [".#.", "#.#", "###", "#.#", "#.#"],
        'B' => ["##.", "#.#", "##.", "#.#", "##."],
        'C' => ["###", "#..", "#..", "#..", "###"],
        'D' => ["##.", "#.#", "#.#", "#.#", "##."],
        'E' => ["###", "#..", "##.", "#..", "###"],
        'F' => ["###", "#..", "##.", "#..", "#.."],
        'G' => ["###", "#..", "#.#", "#.#", "###"],
        'H' => ["#.#", "#.#", "###", "#.#", "#.#"],
        'I' => ["###", ".#.", ".#.", ".#.", "###"],
        'K' => ["#.#", "##.", "#..", "##.", "#.#"],
        'L' => ["#..", "#..", "#..", "#..", "###"],
        'M' => ["#.#", "###", "#.#", "#.#", "#.#"],
        'N' => ["#.#", "###", "###", "###", "#.#"],
        'O' => ["###", "#.#", "#.#", "#.#", "###"],
        'P' => ["###", "#.#", "###", "#..", "#.."],
        'Q' => ["###", "#.#", "#.#", "###", "..#"],
        'R' => ["##.", "#.#", "##.", "#.#", "#.#"],
        'S' => ["###", "#..", "###", "..#", "###"],
        'T' => ["###", ".#.", ".#.", ".#.", ".#."],
        'U' => ["#.#", "#.#", "#.#", "#.#", "###"],
        'V' => ["#.#", "#.#", "#.#", "#.#", ".#."],
        'W' => ["#.#", "#.#", "#.#", "###", "#.#"],
        'X' => ["#.#", "#.#", ".#.", "#.#", "#.#"],
        'Y' => ["#.#", "#.#", ".#.", ".#.", ".#."],
        '(' => [".#.", "#..", "#..", "#..", ".#."],
        ')' => [".#.", "..#", "..#", "..#", ".#."],
        '/' => ["..#", "..#", ".#.", "#..", "#.."],
        '+' => ["...", ".#.", "###", ".#.", "..."],
        _ => return None,
    })
}

/// Width in pixels of `text` at pixel size `px`.
fn text_width(text: &str, px: i32) -> i32 {
    text.chars().count() as i32 * 4 * px
}

fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    text: &str,
    (x, y): (i32, i32),
    px: i32,
    color: &RGBColor,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    for (i, c) in text.to_uppercase().chars().enumerate() {
        let Some(rows) = glyph(c) else { continue };
        let x0 = x + i as i32 * 4 * px;
        for (r, row) in rows.iter().enumerate() {
            for (col, b) in row.bytes().enumerate() {
                if b == b'#' {
                    let (px0, py0) = (x0 + col as i32 * px, y + r as i32 * px);
                    area.draw(&Rectangle::new([(px0, py0), (px0 + px, py0 + px)], color.filled()))?;
                }
            }
        }
    }
    Ok(())
}

/// A histogram of values in [0, 1]: `counts` over equal bins, with the mean and median
/// marked (red and blue lines) and a title line.
pub fn histogram_png(path: &Path, counts: &[usize], mean: f64, median: f64, title: &str) -> Result<()> {
    let err = |e: String| Error::InvalidArgument(format!("{}: cannot draw the histogram: {e}", path.display()));
    let (w, h) = (900i32, 540i32);
    let root = BitMapBackend::new(path, (w as u32, h as u32)).into_drawing_area();
    let run = || -> std::result::Result<(), DrawingAreaErrorKind<_>> {
        root.fill(&WHITE)?;
        let (left, right, top, bottom) = (90, w - 30, 60, h - 60);
        let max = counts.iter().copied().max().unwrap_or(0).max(1);
        let bins = counts.len().max(1);
        let xpix = |v: f64| left + ((right - left) as f64 * v.clamp(0.0, 1.0)).round() as i32;
        let ypix = |c: f64| bottom - ((bottom - top) as f64 * c / max as f64).round() as i32;
        let bar = RGBColor(70, 110, 170);
        for (i, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let (x0, x1) = (xpix(i as f64 / bins as f64), xpix((i + 1) as f64 / bins as f64));
            root.draw(&Rectangle::new(
                [(x0 + 1, ypix(c as f64)), (x1 - 1, bottom)],
                bar.filled(),
            ))?;
        }
        // Axes, ticks and labels.
        root.draw(&PathElement::new(
            vec![(left, top), (left, bottom), (right, bottom)],
            BLACK,
        ))?;
        for k in 0..=10 {
            let v = k as f64 / 10.0;
            let x = xpix(v);
            root.draw(&PathElement::new(vec![(x, bottom), (x, bottom + 6)], BLACK))?;
            if k % 2 == 0 {
                let label = format!("{v:.1}");
                draw_text(&root, &label, (x - text_width(&label, 2) / 2, bottom + 12), 2, &BLACK)?;
            }
        }
        for k in 0..=4 {
            let c = max as f64 * k as f64 / 4.0;
            let y = ypix(c);
            root.draw(&PathElement::new(vec![(left - 6, y), (left, y)], BLACK))?;
            let label = format!("{}", c.round() as usize);
            draw_text(&root, &label, (left - 12 - text_width(&label, 2), y - 5), 2, &BLACK)?;
        }
        for (v, color) in [(mean, RED), (median, BLUE)] {
            let x = xpix(v);
            root.draw(&PathElement::new(vec![(x, top), (x, bottom)], color.stroke_width(2)))?;
        }
        draw_text(&root, title, (left, 20), 3, &BLACK)?;
        draw_text(&root, "TVD", (right - text_width("TVD", 2), bottom + 34), 2, &BLACK)?;
        root.present()?;
        Ok(())
    };
    run().map_err(|e| err(e.to_string()))
}

/// Grouped bars: one group per label, one bar per series (at most 4 colours), values ≥ 0,
/// with the value printed on each bar and a legend of the series.
pub fn bar_chart_png(path: &Path, title: &str, groups: &[(String, Vec<f64>)], series: &[&str]) -> Result<()> {
    let err = |e: String| Error::InvalidArgument(format!("{}: cannot draw the chart: {e}", path.display()));
    let (w, h) = (960i32, 540i32);
    let colors = [
        RGBColor(70, 110, 170),
        RGBColor(230, 130, 40),
        RGBColor(90, 160, 90),
        RGBColor(170, 80, 80),
    ];
    let root = BitMapBackend::new(path, (w as u32, h as u32)).into_drawing_area();
    let run = || -> std::result::Result<(), DrawingAreaErrorKind<_>> {
        root.fill(&WHITE)?;
        let (left, right, top, bottom) = (70, w - 20, 70, h - 70);
        let max = groups
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.15;
        let ypix = |v: f64| bottom - ((bottom - top) as f64 * v / max).round() as i32;
        let gw = (right - left) / groups.len().max(1) as i32;
        let bw = (gw - 30) / series.len().max(1) as i32;
        for (g, (label, vals)) in groups.iter().enumerate() {
            let gx = left + g as i32 * gw + 15;
            for (s, &v) in vals.iter().enumerate() {
                let x0 = gx + s as i32 * bw;
                root.draw(&Rectangle::new(
                    [(x0 + 2, ypix(v)), (x0 + bw - 2, bottom)],
                    colors[s % 4].filled(),
                ))?;
                let text = format!("{v:.2}");
                draw_text(
                    &root,
                    &text,
                    (x0 + bw / 2 - text_width(&text, 2) / 2, ypix(v) - 14),
                    2,
                    &BLACK,
                )?;
            }
            draw_text(
                &root,
                label,
                (gx + (gw - 30) / 2 - text_width(label, 2) / 2, bottom + 12),
                2,
                &BLACK,
            )?;
        }
        root.draw(&PathElement::new(
            vec![(left, top), (left, bottom), (right, bottom)],
            BLACK,
        ))?;
        for k in 0..=4 {
            let v = max * k as f64 / 4.0;
            let y = ypix(v);
            root.draw(&PathElement::new(vec![(left - 6, y), (left, y)], BLACK))?;
            let label = format!("{v:.1}");
            draw_text(&root, &label, (left - 12 - text_width(&label, 2), y - 5), 2, &BLACK)?;
        }
        let mut lx = left;
        for (s, name) in series.iter().enumerate() {
            root.draw(&Rectangle::new(
                [(lx, h - 34), (lx + 14, h - 20)],
                colors[s % 4].filled(),
            ))?;
            draw_text(&root, name, (lx + 20, h - 32), 2, &BLACK)?;
            lx += 40 + text_width(name, 2);
        }
        draw_text(&root, title, (left, 24), 3, &BLACK)?;
        root.present()?;
        Ok(())
    };
    run().map_err(|e| err(e.to_string()))
}
